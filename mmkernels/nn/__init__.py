"""``nn.Module`` layers, thin over the functional ops."""
from .attention_pool import AttentionPool, CrossModalAttentionPool
from .concat_linear import ConcatLinear
from .gated_fusion import GatedFusion
from .norm_concat import NormConcat
from .tensor_fusion import LowRankFusion, TensorFusion, lmf_state_dict_from_official

__all__ = ["NormConcat", "AttentionPool", "CrossModalAttentionPool", "ConcatLinear", "GatedFusion", "TensorFusion", "LowRankFusion",
           "lmf_state_dict_from_official"]
