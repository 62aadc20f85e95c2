"""What runs in a training step: reversible stages, checkpointed units, kept layer outputs,
direct layer calls, and the switches and replays they share."""
