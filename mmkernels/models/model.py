"""An image + speech + text classifier whose pooling and fusion are mmkernels layers.

Per modality an encoder produces tokens, an :class:`~mmkernels.nn.AttentionPool` (with the ragged
lengths, never pad-and-average) pools them to one vector, and a fusion head combines the vectors:

- ``"concat"``: :class:`~mmkernels.nn.NormConcat` (a LayerNorm per modality, concatenated) +
  :class:`~mmkernels.nn.ConcatLinear` with GELU. An absent modality's pooled vector enters as
  zeros, so its LayerNorm outputs just its bias (a learned constant, the same parameter that
  shifts present samples).
- ``"gated"``: :class:`~mmkernels.nn.GatedFusion` (feature-wise gates, softmax over the present
  modalities only, via its ``modality_mask``).
- ``"attention"``: :class:`~mmkernels.nn.CrossModalAttentionPool`: a query made from the mean of
  the present modalities' pooled vectors attends over the tokens of every present modality at
  once (image patches, speech frames, text characters, each with a learned modality embedding),
  each sample's valid tokens gathered to the front of one buffer and pooled with their count as
  ``lengths``; absent modalities contribute no tokens.

Each modality also has a small classifier on its pooled vector (``modality_logits``), trained
with an auxiliary loss, so per-modality accuracy is measured on the same encoders. Training
applies modality dropout (each present modality dropped with probability ``modality_dropout``,
at least one kept per sample), so evaluation with a modality missing works.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backend import BACKENDS, use_backend
from ..nn import (AttentionPool, ConcatLinear, CrossModalAttentionPool, GatedFusion, LowRankFusion, NormConcat,
                  TensorFusion)
from . import layers
from .data import MFCC_FEATURES, MODALITIES, NUM_CLASSES

FUSIONS = ("concat", "gated", "attention", "tfn", "lmf")
# "torch": the model written without mmkernels; the others request that mmkernels backend
MODEL_BACKENDS = ("torch",) + tuple(b for b in BACKENDS if b != "torch")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that shapes :class:`MultimodalClassifier`.

    ``backend``: ``"torch"`` runs the pooling and fusion as plain PyTorch compositions written
    without mmkernels (the baseline); ``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"`` run
    them as mmkernels ops with that backend requested. Parameters and results are the same either
    way.
    """
    modalities: Tuple[str, ...] = MODALITIES
    fusion: str = "gated"
    backend: str = "auto"
    num_classes: int = NUM_CLASSES
    dim: int = 64                      # token / pooled width of every modality
    hidden: int = 128                  # fused width
    heads: int = 4
    tfn_dim: int = 16                  # tfn: per-modality width entering the outer product, K = (tfn_dim + 1)^M
    lmf_rank: int = 4                  # lmf: rank of the factors
    image_channels: int = 1
    image_width: int = 32              # CNN channels (doubled by each downsampling stage)
    image_downsample: int = 1          # stride-2 ResNet stages: 8x8 -> 4x4 patches (CIFAR: 2, 32 -> 8)
    speech_features: int = MFCC_FEATURES
    speech_frontend: Optional[str] = None   # "mfcc": inputs are raw waveforms, torchaudio computes MFCCs
    sample_rate: int = 8000
    text_vocab: int = 256              # byte-level
    text_layers: int = 1
    dropout: float = 0.1
    modality_dropout: float = 0.3
    augment: bool = True               # SpecAugment (torchaudio FrequencyMasking, per-sample time masks) in training

    def __post_init__(self):
        def bad(name, expected):
            raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")
        mods = self.modalities
        if (not isinstance(mods, (tuple, list)) or not mods or len(set(mods)) != len(mods)
                or any(m not in MODALITIES for m in mods)):
            bad("modalities", f"a non-empty tuple of distinct names from {MODALITIES}")
        object.__setattr__(self, "modalities", tuple(m for m in MODALITIES if m in mods))  # canonical order
        if self.fusion not in FUSIONS:
            bad("fusion", f"one of {FUSIONS}")
        if self.backend not in MODEL_BACKENDS:
            bad("backend", f"one of {MODEL_BACKENDS}")
        for name in ("num_classes", "dim", "hidden", "heads", "tfn_dim", "lmf_rank", "image_channels", "image_width",
                     "speech_features", "sample_rate", "text_vocab", "text_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "a positive int")
        if self.dim % self.heads:
            bad("heads", f"a divisor of dim={self.dim}")
        if not isinstance(self.image_downsample, int) or self.image_downsample < 0:
            bad("image_downsample", "an int >= 0")
        if self.speech_frontend not in (None, "mfcc"):
            bad("speech_frontend", "None or 'mfcc'")
        for name in ("dropout", "modality_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "a probability in [0, 1)")


class ModelOutput(NamedTuple):
    logits: torch.Tensor           # [B, num_classes], from the fused representation
    modality_logits: torch.Tensor  # [M, B, num_classes], each modality's own classifier
    modality_mask: torch.Tensor    # [B, M] bool, the modalities this forward used (after dropout)


def _at_least_two(xs):
    """One modality: a constant zero second input ``[B, 1]`` (``[1, 0]`` in the fusion) makes TFN
    and LMF a function of ``[1, x]`` alone."""
    return xs if len(xs) > 1 else [xs[0], xs[0].new_zeros((xs[0].shape[0], 1))]


def sinusoid(n: int, dim: int, device, dtype, offset: float = 0.0) -> torch.Tensor:
    """``[n, dim]`` sine/cosine position codes."""
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None] + offset
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    out = torch.zeros(n, dim, device=device, dtype=torch.float32)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return out.to(dtype)


def _group_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(min(8, channels), channels)


class ImageEncoder(nn.Module):
    """A small ResNet (torchvision's ``BasicBlock``; GroupNorm, so a sample's result does not
    depend on its batch — DDP and single-process steps agree) -> patch tokens ``[B, h*w, dim]``
    with 2-D sine position codes."""

    def __init__(self, in_channels: int, width: int, dim: int, downsample: int):
        super().__init__()
        from torchvision.models.resnet import BasicBlock, conv1x1
        from torchvision.ops.misc import Conv2dNormActivation
        blocks, c = [BasicBlock(width, width, norm_layer=_group_norm)], width
        for _ in range(downsample):
            down = nn.Sequential(conv1x1(c, 2 * c, 2), _group_norm(2 * c))
            blocks.append(BasicBlock(c, 2 * c, stride=2, downsample=down, norm_layer=_group_norm))
            c *= 2
        self.stem = Conv2dNormActivation(in_channels, width, 3, norm_layer=_group_norm)
        self.blocks = nn.Sequential(*blocks)
        self.proj = nn.Linear(c, dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        f = self.blocks(self.stem(image))                       # [B, c, h, w]
        h, w = f.shape[-2:]
        tokens = self.proj(f.flatten(2).transpose(1, 2))        # [B, h*w, dim]
        d = tokens.shape[-1]
        pos = torch.cat([sinusoid(h, d // 2, f.device, tokens.dtype)[:, None].expand(h, w, d // 2),
                         sinusoid(w, d - d // 2, f.device, tokens.dtype)[None].expand(h, w, d - d // 2)], -1)
        return tokens + pos.reshape(h * w, d)


TIME_MASK_FRAMES, TIME_MASK_P = 8, 0.2   # SpecAugment's time masks: at most 8 frames, at most 20% of a sample


def time_mask(feats: torch.Tensor, lengths: torch.Tensor, frames: int, p: float) -> torch.Tensor:
    """SpecAugment's time masking (torchaudio's ``TimeMasking(frames, p=p)``) of each sample of
    ``feats [B, F, T]`` within its own ``lengths[b]`` frames, for the whole batch at once: sample b
    gets one run of ``floor(u * w_b)`` zeroed frames, ``w_b = min(frames, floor(p * lengths[b]))``,
    starting at ``floor(v * (lengths[b] - u * w_b))`` (u, v uniform in [0, 1), drawn per sample), as
    torchaudio draws it for one sample. No value is read on the host (no graph break under
    ``torch.compile``, no sync on a GPU)."""
    n = lengths.to(torch.float32)
    width = torch.minimum(torch.floor(n * p), torch.full_like(n, float(frames))) * torch.rand(n.shape, device=n.device)
    start = torch.floor(torch.rand(n.shape, device=n.device) * (n - width))
    pos = torch.arange(feats.shape[-1], device=feats.device)
    masked = (pos >= start[:, None]) & (pos < (start + torch.floor(width))[:, None])       # [B, T]
    return feats.masked_fill(masked[:, None, :], 0.0)


class SpeechEncoder(nn.Module):
    """Acoustic frames -> frame tokens ``[B, T, dim]``. With ``frontend="mfcc"`` the inputs are raw
    waveforms ``[B, samples]`` and torchaudio's ``MFCC`` computes the frames (25 ms windows, 10 ms
    hop, zero-padded edges); otherwise they are frames ``[B, T, features]``. In training, torchaudio's
    ``FrequencyMasking`` and :func:`time_mask` (SpecAugment) mask bands of each sample (time masks
    drawn within the sample's own frames, the whole batch at once: no host sync). Two
    convolutions (kernel 5, stride 1) keep the frame count, so lengths carry over; padded frames
    are zeroed before each, so a sample's tokens do not depend on how much padding its batch has."""

    def __init__(self, features: int, dim: int, frontend: Optional[str], sample_rate: int, augment: bool):
        super().__init__()
        import torchaudio
        self.features = features
        self.hop = sample_rate // 100
        self.frontend = None
        if frontend == "mfcc":
            self.frontend = torchaudio.transforms.MFCC(
                sample_rate, n_mfcc=features,
                melkwargs=dict(n_fft=2 ** math.ceil(math.log2(sample_rate // 40)), win_length=sample_rate // 40,
                               hop_length=self.hop, n_mels=max(2 * features, 23), pad_mode="constant"))
        self.freq_mask = torchaudio.transforms.FrequencyMasking(max(1, features // 4), iid_masks=True) if augment else None
        self.augment = augment
        self.conv1 = nn.Conv1d(features, dim, 5, padding=2)
        self.conv2 = nn.Conv1d(dim, dim, 5, padding=2)

    def frames(self, x: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(frames [B, features, T], frame lengths [B])``."""
        if self.frontend is None:
            return x.transpose(1, 2), lengths
        # zero past each length, and zero (not reflected) edges: a waveform gives the same frames
        # alone as in a padded batch
        valid = torch.arange(x.shape[-1], device=x.device)[None, :] < lengths[:, None]
        # ([B, 1, samples]: torchaudio's top_db clamp then takes each sample's own maximum, not the batch's)
        feats = self.frontend(torch.where(valid, x, 0.0)[:, None])[:, 0]   # [B, features, samples // hop + 1]
        return feats, torch.div(lengths, self.hop, rounding_mode="floor") + (lengths > 0).to(lengths.dtype)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        feats, lengths = self.frames(x, lengths)
        t = feats.shape[-1]
        valid = torch.arange(t, device=feats.device)[None, :] < lengths[:, None]
        keep = valid[:, None, :]
        feats = torch.where(keep, feats, 0.0)
        if self.training and self.augment:
            feats = time_mask(self.freq_mask(feats), lengths, TIME_MASK_FRAMES, TIME_MASK_P)
        hidden = torch.where(keep, F.gelu(self.conv1(feats)), 0.0)  # padding stays zero for conv2
        tokens = F.gelu(self.conv2(hidden)).transpose(1, 2)          # [B, T, dim]
        return tokens + sinusoid(t, tokens.shape[-1], tokens.device, tokens.dtype), lengths


class TextEncoder(nn.Module):
    """Byte tokens -> character tokens ``[B, L, dim]``: embedding + sine positions + a pre-norm
    ``nn.TransformerEncoder`` with the padding masked out."""

    def __init__(self, vocab: int, dim: int, heads: int, num_layers: int, dropout: float):
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        valid = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]
        x = self.embed(torch.where(valid, tokens, 0))          # padding may hold any value
        x = x + sinusoid(tokens.shape[1], x.shape[-1], x.device, x.dtype)
        # an empty text keeps one (ignored) position attending, so no row is all -inf (NaN);
        # the pooling uses the true lengths, so that row pools to zeros
        pad = torch.arange(tokens.shape[1], device=tokens.device)[None, :] >= lengths.clamp_min(1)[:, None]
        return self.encoder(x, src_key_padding_mask=pad)


class MultimodalClassifier(nn.Module):
    """See the module docstring. ``MultimodalClassifier(config)`` or
    ``MultimodalClassifier(fusion="concat", backend="torch", ...)`` (fields of :class:`ModelConfig`).

    ``forward(inputs, modality_mask=None) -> ModelOutput``. ``inputs`` maps each of
    ``config.modalities`` to its batch (a modality left out or given as None is absent for every
    sample):

    - ``"image"``: ``[B, C, H, W]`` float;
    - ``"speech"``: ``(frames [B, T, features], lengths [B])``, or with ``speech_frontend="mfcc"``
      ``(waveforms [B, samples], lengths [B] in samples)``;
    - ``"text"``: ``(tokens [B, L] int64 in [0, text_vocab), lengths [B])``.

    ``modality_mask`` ``[B, M]`` bool (columns in ``config.modalities`` order) marks the present
    modalities per sample. Padded positions beyond the lengths, and absent samples' inputs, may
    hold anything (NaN, out-of-vocabulary tokens): they reach no output and no gradient. Lengths
    must lie in ``[0, T]`` for every sample; they and the tokens in use are checked on CPU tensors
    (on CUDA that would cost a host sync).
    """

    def __init__(self, config: Optional[ModelConfig] = None, **overrides):
        super().__init__()
        config = replace(config or ModelConfig(), **overrides) if overrides else (config or ModelConfig())
        self.config = cfg = config
        self.modalities = cfg.modalities
        d = cfg.dim
        encoders = {
            "image": lambda: ImageEncoder(cfg.image_channels, cfg.image_width, d, cfg.image_downsample),
            "speech": lambda: SpeechEncoder(cfg.speech_features, d, cfg.speech_frontend, cfg.sample_rate, cfg.augment),
            "text": lambda: TextEncoder(cfg.text_vocab, d, cfg.heads, cfg.text_layers, cfg.dropout),
        }
        self.encoders = nn.ModuleDict({m: encoders[m]() for m in self.modalities})
        self.pools = nn.ModuleDict({m: AttentionPool(d, cfg.heads, key_proj=True) for m in self.modalities})
        self.modality_heads = nn.ModuleDict({m: nn.Linear(d, cfg.num_classes) for m in self.modalities})
        M = len(self.modalities)
        if cfg.fusion == "concat":
            self.norm_concat = NormConcat([d] * M)
            self.fuse = ConcatLinear([M * d], cfg.hidden, activation="gelu")
        elif cfg.fusion == "gated":
            self.fuse = GatedFusion([d] * M, cfg.hidden, gate="feature")
        elif cfg.fusion == "tfn":  # TFN's recipe: small per-modality vectors (K = 17^M), then the outer product
            self.fuse_in = nn.ModuleList([nn.Linear(d, cfg.tfn_dim) for _ in range(M)])
            self.fuse = TensorFusion([cfg.tfn_dim] * M + [1] * (M == 1), cfg.hidden)
        elif cfg.fusion == "lmf":
            self.fuse = LowRankFusion([d] * M + [1] * (M == 1), cfg.hidden, rank=cfg.lmf_rank)
        else:
            self.type_embed = nn.Parameter(torch.randn(M, d) * 0.02)
            self.fuse = CrossModalAttentionPool(d, d, cfg.heads)
            self.fuse_out = nn.Sequential(nn.Linear(d, cfg.hidden), nn.GELU())
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, cfg.num_classes))

    @property
    def backend(self) -> str:
        return self.config.backend

    # ------------------------------------------------------------------------------ checks
    def _check(self, inputs, modality_mask):
        if not isinstance(inputs, Mapping):
            raise ValueError(f"inputs: expected a mapping from modality name ({', '.join(self.modalities)}) "
                             f"to its batch, got {type(inputs).__name__}")
        unknown = [k for k in inputs if k not in self.modalities]
        if unknown:
            raise ValueError(f"inputs: unknown modality {unknown[0]!r}; this model takes {self.modalities}")
        given = {m: inputs.get(m) for m in self.modalities if inputs.get(m) is not None}
        if not given:
            raise ValueError(f"inputs: expected at least one of {self.modalities}, got none")
        out, batch, device = {}, None, None
        for m, v in given.items():
            if m == "image":
                x, lengths = v, None
                c = self.config.image_channels
                if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != c or not x.is_floating_point():
                    raise ValueError(f"inputs['image']: expected a float tensor [B, {c}, H, W], got {_describe(x)}")
                if x.shape[-1] < 1 or x.shape[-2] < 1:
                    raise ValueError(f"inputs['image']: expected H, W >= 1, got {tuple(x.shape)}")
            else:
                if not isinstance(v, (tuple, list)) or len(v) != 2:
                    raise ValueError(f"inputs[{m!r}]: expected a pair (padded batch, lengths [B]), got {_describe(v)}")
                x, lengths = v
                if m == "speech":
                    f = self.config.speech_features
                    if self.config.speech_frontend is None:
                        ok, want = isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[-1] == f, f"[B, T, {f}]"
                    else:
                        ok, want = isinstance(x, torch.Tensor) and x.dim() == 2, "[B, samples] (waveforms)"
                    if not ok or not x.is_floating_point():
                        raise ValueError(f"inputs['speech']: expected a float tensor {want}, got {_describe(x)}")
                else:
                    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype != torch.int64:
                        raise ValueError(f"inputs['text']: expected int64 tokens [B, L], got {_describe(x)}")
                if (not isinstance(lengths, torch.Tensor) or lengths.dim() != 1
                        or lengths.dtype not in (torch.int32, torch.int64) or len(lengths) != len(x)):
                    raise ValueError(f"inputs[{m!r}][1] (lengths): expected int32/int64 [{len(x)}], got {_describe(lengths)}")
                if lengths.device != x.device:
                    raise ValueError(f"inputs[{m!r}][1] (lengths): expected device {x.device}, got {lengths.device}")
                if (len(lengths) and not torch.compiler.is_compiling() and lengths.device.type == "cpu"
                        and (int(lengths.min()) < 0 or int(lengths.max()) > x.shape[1])):
                    raise ValueError(f"inputs[{m!r}][1] (lengths): expected values in [0, {x.shape[1]}], got "
                                     f"[{int(lengths.min())}, {int(lengths.max())}]")
                lengths = lengths.to(torch.int64)
            if batch is None:
                batch, device = x.shape[0], x.device
            elif x.shape[0] != batch:
                raise ValueError(f"inputs[{m!r}]: expected batch size {batch} (as the first modality), got {x.shape[0]}")
            elif x.device != device:
                raise ValueError(f"inputs[{m!r}]: expected device {device} (as the first modality), got {x.device}")
            out[m] = (x, lengths)
        M = len(self.modalities)
        present = torch.tensor([m in given for m in self.modalities], device=device)[None, :].expand(batch, M)
        if modality_mask is not None:
            if (not isinstance(modality_mask, torch.Tensor) or modality_mask.dtype != torch.bool
                    or tuple(modality_mask.shape) != (batch, M)):
                raise ValueError(f"modality_mask: expected a bool tensor [{batch}, {M}] (one column per modality: "
                                 f"{', '.join(self.modalities)}), got {_describe(modality_mask)}")
            if modality_mask.device != device:
                raise ValueError(f"modality_mask: expected device {device}, got {modality_mask.device}")
            present = present & modality_mask
        if "text" in out and device.type == "cpu" and not torch.compiler.is_compiling():
            tokens, n = out["text"]
            col = self.modalities.index("text")
            used = tokens[(torch.arange(tokens.shape[1])[None, :] < n[:, None]) & present[:, col:col + 1]]
            if used.numel() and (int(used.min()) < 0 or int(used.max()) >= self.config.text_vocab):
                raise ValueError(f"inputs['text']: expected tokens in [0, {self.config.text_vocab}) within the "
                                 f"lengths of present samples, got values in [{int(used.min())}, {int(used.max())}]")
        return out, batch, device, present

    def _modality_dropout(self, present: torch.Tensor) -> torch.Tensor:
        p = self.config.modality_dropout
        if not self.training or p == 0.0 or present.shape[1] == 1:
            return present
        keep = present & (torch.rand(present.shape, device=present.device) >= p)
        # rows left with nothing keep one of their present modalities, chosen at random
        pick = torch.rand(present.shape, device=present.device).masked_fill(~present, -1.0)
        one = torch.zeros_like(present).scatter_(1, pick.argmax(1, keepdim=True), True) & present
        return torch.where(keep.any(1, keepdim=True), keep, one)

    # ----------------------------------------------------------------------------- forward
    def forward(self, inputs: Mapping[str, object], modality_mask: Optional[torch.Tensor] = None) -> ModelOutput:
        if self.backend == "torch":
            return self._forward(inputs, modality_mask, eager=True)
        with use_backend(self.backend):
            return self._forward(inputs, modality_mask, eager=False)

    def _forward(self, inputs, modality_mask, eager: bool) -> ModelOutput:
        batches, B, device, present = self._check(inputs, modality_mask)
        if modality_mask is not None:
            # absent samples' inputs may hold anything (NaN included): zeros before any encoder, so
            # nothing of them reaches an output or a gradient
            for i, m in enumerate(self.modalities):
                if m in batches:
                    x, n = batches[m]
                    keep = present[:, i].view(-1, *([1] * (x.dim() - 1)))
                    batches[m] = (torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)), n)
        present = self._modality_dropout(present)
        d, dtype = self.config.dim, torch.get_default_dtype()
        tokens, lengths, pooled = {}, {}, []
        for i, m in enumerate(self.modalities):
            if m not in batches:
                pooled.append(None)
                continue
            x, n = batches[m]
            if m == "image":
                t = self.encoders[m](x)
            elif m == "speech":
                t, n = self.encoders[m](x, n)
            else:
                t = self.encoders[m](x, n)
            tokens[m], lengths[m] = t, n
            pooled.append(layers.pool(self.pools[m], t, n, eager))
            dtype = t.dtype
        pooled = [p if p is not None else torch.zeros(B, d, device=device, dtype=dtype) for p in pooled]
        modality_logits = torch.stack([self.modality_heads[m](p) for m, p in zip(self.modalities, pooled)])
        cols = present.unbind(1)
        if self.config.fusion == "concat":
            xs = [p.masked_fill(~c[:, None], 0) for p, c in zip(pooled, cols)]
            fused = layers.concat_linear(self.fuse, [layers.norm_concat(self.norm_concat, xs, eager)], eager)
        elif self.config.fusion == "gated":
            fused = layers.gated_fusion(self.fuse, pooled, present, eager)
        elif self.config.fusion == "tfn":  # absent modalities enter as zero vectors ([1, 0, ...])
            xs = [torch.tanh(f(p.masked_fill(~c[:, None], 0))) for f, p, c in zip(self.fuse_in, pooled, cols)]
            fused = F.gelu(layers.tensor_fusion(self.fuse, _at_least_two(xs), eager))
        elif self.config.fusion == "lmf":
            xs = [p.masked_fill(~c[:, None], 0) for p, c in zip(pooled, cols)]
            fused = F.gelu(layers.low_rank_fusion(self.fuse, _at_least_two(xs), eager))
        else:
            fused = self._attention_fusion(tokens, lengths, pooled, present, eager)
        return ModelOutput(self.head(fused), modality_logits, present)

    def _attention_fusion(self, tokens, lengths, pooled, present, eager: bool) -> torch.Tensor:
        chunks, valid = [], []
        for i, m in enumerate(self.modalities):
            if m not in tokens:
                continue
            t = tokens[m]
            ok = present[:, i:i + 1].expand(t.shape[0], t.shape[1])
            if lengths[m] is not None:
                ok = ok & (torch.arange(t.shape[1], device=t.device)[None, :] < lengths[m][:, None])
            chunks.append(t + self.type_embed[i].to(t.dtype))
            valid.append(ok)
        allt, valid = torch.cat(chunks, 1), torch.cat(valid, 1)             # [B, sum L_m, d]
        # each sample's valid tokens moved to the front (a stable sort keeps their order): static
        # shapes, no host sync, no graph break; what lies past a sample's count is never read
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        front = allt.gather(1, order[..., None].expand(-1, -1, allt.shape[-1]))
        counts = valid.sum(1)
        stacked = torch.where(present[..., None], torch.stack(pooled, 1), 0.0)            # [B, M, d]
        context = stacked.sum(1) / present.sum(1, keepdim=True).clamp_min(1).to(stacked.dtype)
        out = layers.cross_pool(self.fuse, front, context, counts, eager)
        return self.fuse_out(out)


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"{v.dtype} tensor of shape {tuple(v.shape)}"
    return type(v).__name__
