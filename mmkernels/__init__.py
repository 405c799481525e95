"""mmkernels: fused GPU kernels for multimodal fusion layers (Triton and CUDA C++), each behind
torch autograd and ``torch.library``, each with a PyTorch reference that is also the CPU path."""
from . import nn, ops
from .backend import BACKENDS, BackendError, get_backend, set_backend, use_backend
from .ops.attention_pool import attention_pool, attention_pool_varlen
from .ops.concat_linear import concat_linear
from .ops.gated_sum import gated_sum
from .ops.latent_pool import latent_pool, latent_pool_varlen
from .ops.low_rank_fusion import low_rank_fusion
from .ops.norm_concat import norm_concat
from .ops.tensor_fusion import tensor_fusion
from . import patch
from .patch import PatchReport, unpatch

__version__ = "0.1.0"
__all__ = ["norm_concat", "attention_pool", "attention_pool_varlen", "concat_linear", "gated_sum",
           "latent_pool", "latent_pool_varlen", "tensor_fusion", "low_rank_fusion", "nn", "set_backend",
           "get_backend", "use_backend", "BACKENDS", "BackendError", "patch", "unpatch", "PatchReport"]
