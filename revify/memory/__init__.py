"""Memory and cost: measuring real steps, projecting steps on fake tensors, the analysis
tables, and per-step op, call and sync counts."""
