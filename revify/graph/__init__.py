"""Step 1-2 of the pipeline: trace the model with torch.fx, record shapes, find the residual
blocks, and what revify knows about ops and channels."""
