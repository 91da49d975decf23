"""training: offline training and evaluation runs for toist (one CPU to many GPUs with torchrun)."""
