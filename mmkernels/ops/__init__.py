"""One folder per op. ``OPS`` lists them for the test and benchmark machinery."""
from . import norm_concat

OPS = {"norm_concat": norm_concat}


def bench_specs():
    """Every op's benchmark spec (imported lazily: the harness is not needed to use the ops)."""
    from .norm_concat.bench import SPEC as norm_concat_spec
    return {"norm_concat": norm_concat_spec}
