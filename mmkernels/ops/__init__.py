"""One folder per op. ``OPS`` lists them for the test and benchmark machinery."""
from . import attention_pool, concat_linear, norm_concat

OPS = {"norm_concat": norm_concat, "attention_pool": attention_pool, "concat_linear": concat_linear}


def bench_specs():
    """Every op's benchmark spec (imported lazily: the harness is not needed to use the ops)."""
    from .attention_pool.bench import SPEC as attention_pool_spec
    from .concat_linear.bench import SPEC as concat_linear_spec
    from .norm_concat.bench import SPEC as norm_concat_spec
    return {"norm_concat": norm_concat_spec, "attention_pool": attention_pool_spec,
            "concat_linear": concat_linear_spec}
