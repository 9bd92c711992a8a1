"""`domainlm train`: data loading, the training step, the loop, parallelism and checkpoints."""
