"""The pure-PyTorch backend: oracle for the GPU tests, CPU backend, benchmark baseline."""

from .ht import ReferenceHT
from .ll import ReferenceLL

__all__ = ["ReferenceHT", "ReferenceLL"]
