"""One experiment point: its settings, the architectures, the training loop, checkpoints and metrics."""
