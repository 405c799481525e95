"""The argument checks run on every call, so well-formed input is accepted by a quick pass; the
quick pass must accept exactly what the detailed checks accept, and anything else must get the
detailed checks' error."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mmkernels.ops._util import _check_modalities, check_modalities

DTYPES = (torch.float32, torch.float16, torch.float64, torch.bfloat16, torch.int64, torch.bool)


@st.composite
def entries(draw):
    kind = draw(st.sampled_from(("tensor", "tensor", "tensor", "parameter", "array", "none", "int")))
    if kind in ("tensor", "parameter"):
        lead = draw(st.sampled_from(((2,), (3,), (2, 3), ())))
        d = draw(st.sampled_from((0, 1, 4)))
        shape = (*lead, d) if draw(st.booleans()) or not lead else lead
        t = torch.zeros(shape, dtype=draw(st.sampled_from(DTYPES)),
                        device=draw(st.sampled_from(("cpu", "cpu", "meta"))))
        return torch.nn.Parameter(t, requires_grad=False) if kind == "parameter" else t
    return {"array": np.zeros((2, 4), dtype=np.float32), "none": None, "int": 3}[kind]


@st.composite
def containers(draw):
    kind = draw(st.sampled_from(("list", "list", "tuple", "tensor", "empty", "none")))
    if kind in ("list", "tuple"):
        items = draw(st.lists(entries(), min_size=1, max_size=4))
        return items if kind == "list" else tuple(items)
    return {"tensor": torch.zeros(2, 3, 4), "empty": [], "none": None}[kind]


def _outcome(check, xs):
    try:
        got, dims = check(xs)
    except ValueError as e:
        return ("error", str(e))
    return ("ok", type(got), [id(t) for t in got], list(dims))


@settings(max_examples=400)
@given(containers())
def test_quick_pass_accepts_and_refuses_what_the_detailed_checks_do(xs):
    assert _outcome(check_modalities, xs) == _outcome(_check_modalities, xs)


def test_quick_pass_returns_a_list_and_the_widths():
    xs = (torch.zeros(2, 3), torch.zeros(2, 5))
    got, dims = check_modalities(xs)
    assert type(got) is list and got[0] is xs[0] and got[1] is xs[1] and dims == [3, 5]


@pytest.mark.parametrize("xs, message", [
    ([torch.zeros(2, 3), torch.zeros(3, 3)], r"xs\[1\]: expected leading dims \(2,\) \(as xs\[0\]\), got \(3,\)"),
    ([torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)], r"xs\[1\]: expected dtype torch.float32"),
    ([torch.zeros(2, 0)], r"xs\[0\]: expected shape \[\.\.\., D\] with D >= 1"),
    ([torch.zeros(2, 3, dtype=torch.int64)], r"xs\[0\]: expected a floating dtype"),
    ([torch.zeros(2, 3), torch.zeros(2, 3, device="meta")], r"xs\[1\]: expected device cpu"),
])
def test_refusals_name_the_entry(xs, message):
    with pytest.raises(ValueError, match=message):
        check_modalities(xs)
