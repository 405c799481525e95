"""One folder per op. ``OPS`` lists them for the test and benchmark machinery."""
from .. import candidates
from . import attention_pool, concat_linear, gated_sum, latent_pool, low_rank_fusion, norm_concat, tensor_fusion

OPS = {"norm_concat": norm_concat, "attention_pool": attention_pool, "concat_linear": concat_linear,
       "gated_sum": gated_sum, "latent_pool": latent_pool, "tensor_fusion": tensor_fusion,
       "low_rank_fusion": low_rank_fusion}
candidates.check_forced()   # MMKERNELS_CANDIDATES may name only the slots declared above


def bench_specs():
    """Every op's benchmark spec, plus ``gated_fusion`` (the whole GatedFusion layer: its folder's
    op, fusion_projections, launches no Triton kernel of its own); imported lazily: the harness is
    not needed to use the ops."""
    from .attention_pool.bench import SPEC as attention_pool_spec
    from .concat_linear.bench import SPEC as concat_linear_spec
    from .gated_fusion.bench import SPEC as gated_fusion_spec
    from .gated_sum.bench import SPEC as gated_sum_spec
    from .latent_pool.bench import SPEC as latent_pool_spec
    from .low_rank_fusion.bench import SPEC as low_rank_fusion_spec
    from .norm_concat.bench import SPEC as norm_concat_spec
    from .tensor_fusion.bench import SPEC as tensor_fusion_spec
    return {"norm_concat": norm_concat_spec, "attention_pool": attention_pool_spec,
            "concat_linear": concat_linear_spec, "gated_sum": gated_sum_spec, "gated_fusion": gated_fusion_spec,
            "latent_pool": latent_pool_spec, "tensor_fusion": tensor_fusion_spec,
            "low_rank_fusion": low_rank_fusion_spec}
