"""augserve: GPU image augmentation as a gRPC service for PyTorch training."""

__version__ = "0.1.0"
