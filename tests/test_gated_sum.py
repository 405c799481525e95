"""gated_sum: the spec is ``out = sum_m softmax_m(z)_m * tanh(h_pre_m)`` over the present
modalities (absent ones weigh exactly 0, their values never reach anything, a row with nothing
present gives 0). Every backend must match it forward and backward, on odd shapes, views, empty
batches, and reject bad input early."""
import pytest
import torch
from hypothesis import given, strategies as st

import mmkernels
from mmkernels import candidates
from mmkernels.ops.gated_sum import triton as tri
from mmkernels.ops.gated_sum.reference import gated_sum_ref
from mmkernels.testing import assert_close

from conftest import HAS_CUDA, TRITON_DEVICE, TRITON_DTYPES


@pytest.fixture(autouse=True, scope="module", params=candidates.SLOTS[tri.BWD_SLOT], ids=lambda c: f"bwd={c}")
def bwd_candidate(request):
    """Every test runs under each candidate of the Triton backward (the GPU check's tournament
    picks one per GPU; feature gates take it, modality gates always the padded design)."""
    with candidates.use(tri.BWD_SLOT, request.param):
        yield request.param


def make(lead, m, h, dtype, device, feature=True, mask="random", scale=2.0):
    """h_pre, z (feature or modality gates) and a mask: None, "random" (some rows all absent), or
    "all" / "none" present."""
    h_pre = (torch.randn(*lead, m, h, device=device) * scale).to(dtype)
    z = (torch.randn(*((*lead, m, h) if feature else (*lead, m)), device=device) * scale).to(dtype)
    if mask is None:
        mk = None
    elif mask == "random":
        mk = torch.rand(*lead, m, device=device) > 0.4
        if mk.numel():
            mk.view(-1, m)[0] = False       # one row with nothing present
    else:
        mk = torch.full((*lead, m), mask == "all", dtype=torch.bool, device=device)
    return h_pre, z, mk


def expected(h_pre, z, mask, dy):
    """float64 reference output and gradients."""
    h64 = h_pre.detach().double().requires_grad_()
    z64 = z.detach().double().requires_grad_()
    out = gated_sum_ref(h64, z64, mask)
    return (out,) + torch.autograd.grad(out, [h64, z64], dy.double())


def run(backend, h_pre, z, mask, dy):
    h_pre = h_pre.detach().requires_grad_()
    z = z.detach().requires_grad_()
    with mmkernels.use_backend(backend):
        out = mmkernels.gated_sum(h_pre, z, mask)
        return (out,) + torch.autograd.grad(out, [h_pre, z], dy)


def check(backend, lead, m, h, dtype, device, feature=True, mask="random", views=None, dy_view=None):
    h_pre, z, mk = make(lead, m, h, dtype, device, feature, mask)
    if views is not None:
        h_pre, z, mk = views(h_pre, z, mk)
    dy = torch.randn(*lead, h, device=device).to(dtype)
    if dy_view is not None:
        dy = dy_view(dy)
    out, dh, dz = run(backend, h_pre, z, mk, dy)
    ref, rdh, rdz = expected(h_pre, z, mk, dy)
    assert out.dtype == dtype and out.shape == (*lead, h)
    assert_close(out, ref, dtype, f"{backend} out")
    assert_close(dh, rdh, dtype, f"{backend} dh_pre", scale=True)
    assert_close(dz, rdz, dtype, f"{backend} dz", scale=True)
    return out, dh, dz, mk


# --- the reference is the specification -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_is_softmax_weighted_tanh(dtype):
    h_pre, z, _ = make((5,), 3, 7, dtype, "cpu", mask=None)
    g = torch.softmax(z, dim=1)
    torch.testing.assert_close(mmkernels.gated_sum(h_pre, z), (g * torch.tanh(h_pre)).sum(1))
    zm = torch.randn(5, 3, dtype=dtype)
    torch.testing.assert_close(mmkernels.gated_sum(h_pre, zm), (torch.softmax(zm, 1)[..., None] * torch.tanh(h_pre)).sum(1))


def test_reference_mask_is_softmax_over_present_modalities_only():
    h_pre, z, _ = make((4,), 3, 6, torch.float64, "cpu", mask=None)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    out = mmkernels.gated_sum(h_pre, z, mask)
    for b in range(4):
        keep = mask[b].nonzero().flatten()
        if len(keep) == 0:
            assert (out[b] == 0).all()
            continue
        g = torch.softmax(z[b, keep], dim=0)
        torch.testing.assert_close(out[b], (g * torch.tanh(h_pre[b, keep])).sum(0))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_two_modalities_are_the_gmu(backend):
    # Arevalo et al.: h = s * tanh(h_1) + (1 - s) * tanh(h_2), s = sigmoid(z_1 - z_2)
    h_pre, z, _ = make((9,), 2, 13, torch.float32, TRITON_DEVICE, mask=None)
    with mmkernels.use_backend(backend):
        out = mmkernels.gated_sum(h_pre, z)
    s = torch.sigmoid(z[:, 0] - z[:, 1])
    want = s * torch.tanh(h_pre[:, 0]) + (1 - s) * torch.tanh(h_pre[:, 1])
    assert_close(out, want.double(), torch.float32, "gmu")


@pytest.mark.parametrize("feature", [True, False], ids=["feature", "modality"])
def test_gradcheck_reference_fp64(feature):
    h_pre, z, mask = make((4,), 3, 5, torch.float64, "cpu", feature=feature)
    h_pre.requires_grad_()
    z.requires_grad_()

    def f(h, g):
        with mmkernels.use_backend("reference"):
            return mmkernels.gated_sum(h, g, mask)
    assert torch.autograd.gradcheck(f, (h_pre, z))
    assert torch.autograd.gradgradcheck(lambda h, g: gated_sum_ref(h, g, mask), (h_pre, z))


# --- the Triton kernels against the reference -----------------------------------------------------

SHAPES = [((13,), 3, 37), ((7,), 1, 16), ((5,), 8, 40), ((9,), 2, 1), ((3,), 5, 700), ((2, 3), 3, 24),
          ((6,), 11, 9)]


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("lead,m,h", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("feature", [True, False], ids=["feature", "modality"])
@pytest.mark.parametrize("mask", [None, "random"], ids=["nomask", "mask"])
def test_triton_matches_reference(dtype, lead, m, h, feature, mask):
    check("triton", lead, m, h, dtype, TRITON_DEVICE, feature, mask)


@pytest.mark.parametrize("feature", [True, False], ids=["feature", "modality"])
def test_triton_walks_several_hidden_chunks(feature):
    # H wider than any tile: the modality-gate backward sums dz over several chunks of H
    check("triton", (3,), 2, 1100, torch.float32, TRITON_DEVICE, feature)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("feature", [True, False], ids=["feature", "modality"])
def test_absent_modalities_do_not_leak_nan(backend, feature):
    h_pre, z, mask = make((6,), 3, 20, torch.float32, TRITON_DEVICE, feature)
    clean_h, clean_z = h_pre.clone(), z.clone()
    absent = ~mask
    h_pre[absent] = float("nan")
    z[absent] = float("nan")
    clean_h[absent] = 0.0
    clean_z[absent] = 0.0
    dy = torch.randn(6, 20, device=TRITON_DEVICE)
    out, dh, dz = run(backend, h_pre, z, mask, dy)
    want, wdh, wdz = run("reference", clean_h, clean_z, mask, dy)
    for got, ref in ((out, want), (dh, wdh), (dz, wdz)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    assert (dh[absent] == 0).all() and (dz[absent] == 0).all()   # absent: exactly zero gradients


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("feature", [True, False], ids=["feature", "modality"])
def test_rows_with_nothing_present_give_zeros(backend, feature):
    h_pre, z, mask = make((4,), 3, 10, torch.float32, TRITON_DEVICE, feature, mask="none")
    out, dh, dz = run(backend, h_pre, z, mask, torch.randn(4, 10, device=TRITON_DEVICE))
    assert (out == 0).all() and (dh == 0).all() and (dz == 0).all()


@pytest.mark.parametrize("feature", [True, False], ids=["feature", "modality"])
def test_a_row_whose_logits_are_all_minus_inf(feature):
    # -inf weighs 0 like an absent modality; a row of them all is 0 on the kernels, and NaN (the
    # softmax's 0/0, as the plain composition gives) on torch and reference; other rows agree
    h_pre, z, _ = make((4,), 3, 10, torch.float32, TRITON_DEVICE, feature, mask="none")
    z[1] = float("-inf")
    z[2, 0] = float("-inf")
    want = mmkernels.gated_sum(h_pre, z, backend="reference")
    assert torch.isnan(want[1]).all() and torch.isnan(mmkernels.gated_sum(h_pre, z, backend="torch")[1]).all()
    got = mmkernels.gated_sum(h_pre, z, backend="triton")
    assert (got[1] == 0).all()
    keep = [0, 2, 3]
    torch.testing.assert_close(got[keep], want[keep], atol=1e-6, rtol=1e-5)


def test_all_present_mask_equals_no_mask():
    h_pre, z, mask = make((5,), 3, 33, torch.float32, TRITON_DEVICE, mask="all")
    dy = torch.randn(5, 33, device=TRITON_DEVICE)
    for a, b in zip(run("triton", h_pre, z, mask, dy), run("triton", h_pre, z, None, dy)):
        torch.testing.assert_close(a, b)


def test_large_logits_do_not_overflow():
    # softmax is shifted by the row's max over the present modalities: logits of +-1e4 are fine
    h_pre, z, mask = make((4,), 3, 8, torch.float32, TRITON_DEVICE)
    z = z * 5e3
    dy = torch.randn(4, 8, device=TRITON_DEVICE)
    for got, ref in zip(run("triton", h_pre, z, mask, dy), expected(h_pre, z, mask, dy)):
        assert torch.isfinite(got).all()
        assert_close(got, ref, torch.float32, "large logits", scale=True)


VIEWS = {
    # h_pre from a modality-first buffer, z a column slice, mask transposed
    "modality-first": lambda h, z, m: (h.transpose(0, 1).contiguous().transpose(0, 1),
                                       z.transpose(0, 1).contiguous().transpose(0, 1),
                                       None if m is None else m.t().contiguous().t()),
    "strided-hidden": lambda h, z, m: (torch.cat([h, h], -1)[..., ::2], torch.cat([z, z], -1)[..., ::2], m),
    "padded-rows": lambda h, z, m: (torch.cat([h, h], -2)[..., : h.shape[-2], :],
                                    torch.cat([z, z], -2)[..., : z.shape[-2], :], m),
}


@pytest.mark.parametrize("view", VIEWS, ids=str)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_non_contiguous_inputs(view, dtype):
    check("triton", (7,), 3, 24, dtype, TRITON_DEVICE, views=VIEWS[view])


def test_triton_non_contiguous_grad_out_and_leading_dims():
    lead_view = lambda h, z, m: (h.transpose(0, 1), z.transpose(0, 1), m.transpose(0, 1))  # noqa: E731
    check("triton", (4, 3), 3, 16, torch.float32, TRITON_DEVICE, views=lambda h, z, m: lead_view(*lead_view(h, z, m)),
          dy_view=lambda d: torch.cat([d, d], -1)[..., ::2])
    # leading dims that do not collapse into one stride (copied once by reshape)
    h_pre, z, mask = make((3, 4), 2, 8, torch.float32, TRITON_DEVICE)
    h_pre, z, mask = lead_view(h_pre, z, mask)
    dy = torch.randn(4, 3, 8, device=TRITON_DEVICE)
    for got, ref in zip(run("triton", h_pre, z, mask, dy), expected(h_pre, z, mask, dy)):
        assert_close(got, ref, torch.float32, "transposed lead", scale=True)


def test_triton_64_bit_offsets_path(monkeypatch):
    # OFF64 (strides whose in-row offsets pass 2^31) switches the tile offsets to int64; the same
    # results on a small case where it is forced
    seen = []
    launch = tri.launch_tuned

    def recording(tuned, grid, args, consts, fallback=None):
        seen.append(consts["OFF64"])
        launch(tuned, grid, args, consts, fallback)
    monkeypatch.setattr(tri, "_off64", lambda *a: True)
    monkeypatch.setattr(tri, "launch_tuned", recording)
    check("triton", (5,), 3, 20, torch.float32, TRITON_DEVICE)
    check("triton", (5,), 3, 20, torch.float32, TRITON_DEVICE, feature=False)
    assert seen == [True] * 4


def test_off64_is_chosen_from_the_strides():
    from mmkernels.ops.gated_sum.triton import _off64 as off64
    assert not off64(3, 1024, (1024, 1), (1024, 1))
    assert off64(3, 1024, (2 ** 30 + 1, 1))        # a modality-first buffer of 2^30+ elements per modality


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("feature", [True, False], ids=["feature", "modality"])
def test_empty_batch(backend, feature):
    h_pre, z, mask = make((0,), 3, 5, torch.float32, TRITON_DEVICE, feature)
    out, dh, dz = run(backend, h_pre, z, mask, torch.zeros(0, 5, device=TRITON_DEVICE))
    assert out.shape == (0, 5) and dh.shape == h_pre.shape and dz.shape == z.shape


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("feature", [True, False], ids=["feature", "modality"])
def test_zero_width_hidden(backend, feature):
    h_pre, z, mask = make((4,), 3, 0, torch.float32, TRITON_DEVICE, feature)
    out, dh, dz = run(backend, h_pre, z, mask, torch.zeros(4, 0, device=TRITON_DEVICE))
    assert out.shape == (4, 0) and dh.shape == h_pre.shape and dz.shape == z.shape and (dz == 0).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0, on purpose
@pytest.mark.parametrize("feature", [True, False], ids=["feature", "modality"])
def test_absent_gradients_stay_zero_for_non_finite_grad_out(feature):
    h_pre, z, mask = make((5,), 3, 12, torch.float32, TRITON_DEVICE, feature)
    dy = torch.randn(5, 12, device=TRITON_DEVICE)
    dy[1, 3] = float("inf")
    dy[2, 0] = float("nan")
    _, dh, dz = run("triton", h_pre, z, mask, dy)
    assert (dh[~mask] == 0).all() and (dz[~mask] == 0).all()


@given(b=st.integers(0, 9), m=st.integers(1, 9), h=st.integers(1, 80), feature=st.booleans(),
       mask=st.sampled_from([None, "random", "none"]), dtype=st.sampled_from(TRITON_DTYPES))
def test_triton_shape_sweep(b, m, h, feature, mask, dtype):
    check("triton", (b,), m, h, dtype, TRITON_DEVICE, feature, mask)


@pytest.mark.parametrize("m", [9, 17, tri.MAX_M])
def test_triton_many_modalities(m):
    check("triton", (3,), m, 20, torch.float32, TRITON_DEVICE)
    check("triton", (3,), m, 20, torch.float16, TRITON_DEVICE, feature=False)


def test_more_modalities_than_a_tile_go_to_the_reference():
    h_pre, z, _ = make((2,), tri.MAX_M + 1, 4, torch.float32, "cpu", mask=None)
    from mmkernels.backend import reasons
    why = reasons(tri, True, dict(h_pre=h_pre, z=z, modality_mask=None))
    assert f"{tri.MAX_M + 1} modalities > {tri.MAX_M} (one tile holds them all)" in why


# --- launch configuration -------------------------------------------------------------------------

@pytest.mark.parametrize("bwd", [False, True])
@pytest.mark.parametrize("mp,h", [(4, 1024), (2, 512), (8, 256), (1, 1), (4, 300)])
def test_autotune_space_is_pruned_to_fitting_tiles(bwd, mp, h):
    from triton import Config
    configs = [Config({"ROWS": r, "BLOCK_H": bh}, num_warps=w) for r, bh, w in tri._space()]
    for dtype in (torch.bfloat16, torch.float32):
        kept = tri._prune(configs, {"H": h, "HP": torch.empty(0, dtype=dtype)}, MP=mp, BWD=bwd)
        assert kept and len(kept) <= 12
        for c in kept:   # the forward unrolls [ROWS, BLOCK_H] tiles over M, the backward holds [ROWS, MP, BLOCK_H]
            r, bh = c.kwargs["ROWS"], c.kwargs["BLOCK_H"]
            cost = r * bh * mp * (dtype.itemsize // 2)
            assert bh <= max(64, 1 << (h - 1).bit_length())
            assert cost <= (4096 if bwd else 8192) or len(kept) == 1, c
            assert r * bh * (mp if bwd else 1) * dtype.itemsize >= 2048 or len(kept) == 1  # 16-byte loads
            assert c.num_warps == (4 if r * bh * (mp if bwd else 1) <= 2048 else 8)


# --- bad input: one ValueError naming the argument -----------------------------------------------

def _bad_cases():
    h, z, mk = torch.randn(4, 3, 5), torch.randn(4, 3, 5), torch.ones(4, 3, dtype=torch.bool)
    return {
        "h_pre not a tensor": (dict(h_pre=[h], z=z), r"h_pre: expected a tensor"),
        "h_pre rank": (dict(h_pre=torch.randn(5), z=z), r"h_pre: expected shape \[\.\.\., M, H\]"),
        "h_pre int": (dict(h_pre=h.int(), z=z), r"h_pre: expected a floating dtype"),
        "z shape": (dict(h_pre=h, z=torch.randn(4, 3, 6)), r"z: expected shape \(4, 3, 5\) .* or \(4, 3\)"),
        "z dtype": (dict(h_pre=h, z=z.half()), r"z: expected dtype torch.float32"),
        "z device": (dict(h_pre=h, z=z.to("meta")), r"z: expected device cpu"),
        "mask dtype": (dict(h_pre=h, z=z, modality_mask=mk.float()), r"modality_mask: expected dtype torch.bool"),
        "mask shape": (dict(h_pre=h, z=z, modality_mask=mk[:, :2]), r"modality_mask: expected shape \(4, 3\)"),
        "mask type": (dict(h_pre=h, z=z, modality_mask=[[True] * 3] * 4), r"modality_mask: expected None or a bool tensor"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises_value_error(case):
    kwargs, pattern = _bad_cases()[case]
    with pytest.raises(ValueError, match=pattern):
        mmkernels.gated_sum(**kwargs)


# --- on a GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (large shapes and bf16 on real hardware)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("lead,m,h", [((4096,), 3, 1024), ((8192,), 2, 512), ((1000,), 8, 200), ((3, 577), 3, 768)])
@pytest.mark.parametrize("feature", [True, False], ids=["feature", "modality"])
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_gpu_large(dtype, lead, m, h, feature, backend):
    check(backend, lead, m, h, dtype, "cuda", feature)


@pytest.mark.gpu
@pytest.mark.gpu_configs
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (every autotune configuration, bf16, on real hardware)")
@pytest.mark.parametrize("bwd", [False, True], ids=["fwd", "bwd"])
def test_gpu_every_autotune_configuration_matches_reference(monkeypatch, bwd):
    # The autotuner may pick any configuration its pruning keeps for the benchmark presets: each
    # must be right, not only the heuristic one the other GPU tests run.
    from triton import Config

    from mmkernels import runtime
    monkeypatch.setattr(runtime, "AUTOTUNE", False)  # launch the heuristic, patched to each config below
    configs = [Config({"ROWS": r, "BLOCK_H": bh}, num_warps=w) for r, bh, w in tri._space()]
    chosen = {(c.kwargs["ROWS"], c.kwargs["BLOCK_H"], c.num_warps)
              for mp, h in [(4, 1024), (2, 512)]
              for c in tri._prune(configs, {"H": h, "HP": torch.empty(0, dtype=torch.bfloat16)}, MP=mp, BWD=bwd)}
    heuristic = tri._heuristic_tile
    for cfg in sorted(chosen):   # the other kernel keeps its heuristic configuration
        monkeypatch.setattr(tri, "_heuristic_tile", lambda mp, h, backward, es=2, c=cfg:
                            c if backward == bwd else heuristic(mp, h, backward, es))
        check("triton", (37,), 3, 300, torch.bfloat16, "cuda", feature=True)
        check("triton", (37,), 3, 300, torch.bfloat16, "cuda", feature=False)
