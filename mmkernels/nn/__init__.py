"""``nn.Module`` layers, thin over the functional ops."""
from .norm_concat import NormConcat

__all__ = ["NormConcat"]
