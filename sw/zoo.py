"""The model zoo: small CNNs defined and trained by the project on CPU, cached.

=================  =====================================================================
name               architecture (input 1x28x28, MNIST normalized to [-1, 1], see data.py)
=================  =====================================================================
``lenet``          the example network, LeNet-5-like: three Conv+BN+ReLU (5x5, 5x5, 3x3)
                   with max-pooling between them, then two fully connected layers
``vgg_small``      five 3x3 Conv+BN+ReLU in three stages (16, 16 | 32, 32 | 64 channels),
                   max-pooling between stages, global average pooling, one linear layer
``resnet_small``   a 3x3 Conv+BN+ReLU stem and three basic residual blocks (16, 32, 64
                   channels, the last two with stride 2 and a 1x1 Conv+BN shortcut). In each
                   block the first conv is Conv+BN+ReLU (an engine layer); the second conv
                   and the shortcut are Conv+BN feeding the add, so they stay in PyTorch
=================  =====================================================================

:func:`get_model` returns a trained model in eval mode, from the cache
(``cache_dir("zoo")``) or trained with a progress bar and then cached. The cache key covers
the architecture (the module's ``repr``), the training hyper-parameters, the training data's
content hash and :data:`ZOO_VERSION`. Two processes asking for the same model at once (two
pytest-xdist workers) serialize on a lock file: one trains, the other then loads; the file
is written to a temporary name and renamed, so a reader never sees half a model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .layer import atomic_write_bytes
from .paths import cache_dir

__all__ = ["LeNet", "VGGSmall", "ResNetSmall", "TrainSpec", "MODELS", "list_models", "build",
           "get_model", "train", "evaluate", "model_info", "ZOO_VERSION"]

#: Bump when training code changes in a way the key cannot see.
ZOO_VERSION = 2


class LeNet(nn.Module):
    """LeNet-5-like example network: 3 x (Conv+BN+ReLU), max-pooling, 2 linear layers."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5, padding=2, bias=False)    # 8x28x28
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)                              # 8x14x14
        self.conv2 = nn.Conv2d(8, 16, 5, bias=False)              # 16x10x10
        self.bn2 = nn.BatchNorm2d(16)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)                              # 16x5x5
        self.conv3 = nn.Conv2d(16, 32, 3, padding=1, bias=False)  # 32x5x5
        self.bn3 = nn.BatchNorm2d(32)
        self.relu3 = nn.ReLU()
        self.fc1 = nn.Linear(32 * 5 * 5, 84)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = torch.flatten(x, 1)
        return self.fc2(self.relu4(self.fc1(x)))


def _conv_bn_relu(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class VGGSmall(nn.Module):
    """VGG-style: 3x3 Conv+BN+ReLU stages (16,16 | 32,32 | 64), max-pool, global average."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(1, 16), _conv_bn_relu(16, 16), nn.MaxPool2d(2),     # 16x14x14
            _conv_bn_relu(16, 32), _conv_bn_relu(32, 32), nn.MaxPool2d(2),    # 32x7x7
            _conv_bn_relu(32, 64),                                            # 64x7x7
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """ResNet basic block: Conv+BN+ReLU, Conv+BN, add the (projected) input, ReLU."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """ResNet-style: Conv+BN+ReLU stem, three basic blocks (16, 32/2, 64/2), average, linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = _conv_bn_relu(1, 16)                  # 16x28x28
        self.layer1 = BasicBlock(16, 16)                  # 16x28x28
        self.layer2 = BasicBlock(16, 32, stride=2)        # 32x14x14
        self.layer3 = BasicBlock(32, 64, stride=2)        # 64x7x7
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@dataclass(frozen=True)
class TrainSpec:
    """Training hyper-parameters (part of the cache key)."""

    epochs: int
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0


#: name -> (constructor, training hyper-parameters)
MODELS = {
    "lenet": (LeNet, TrainSpec(epochs=12)),
    "vgg_small": (VGGSmall, TrainSpec(epochs=8)),
    "resnet_small": (ResNetSmall, TrainSpec(epochs=6)),
}


def list_models() -> list[str]:
    """Names :func:`get_model` accepts."""
    return list(MODELS)


def build(name: str) -> nn.Module:
    """A fresh, untrained instance of zoo model ``name``."""
    if name not in MODELS:
        raise ValueError(f"model = {name!r}: not in the zoo ({', '.join(MODELS)})")
    return MODELS[name][0]()


def _key(name: str, spec: TrainSpec, data_digest: str) -> str:
    text = json.dumps({"arch": repr(build(name)), "spec": asdict(spec), "data": data_digest,
                       "zoo": ZOO_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: Intra-op threads while training: fixed, because the order of float sums (and so the
#: trained weights) depends on it; with it the same model comes out of every run.
TRAIN_THREADS = 1


@contextlib.contextmanager
def _threads():
    """Train on :data:`TRAIN_THREADS` threads, whatever the machine and the test runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def evaluate(model: nn.Module, split, batch: int = 500) -> float:
    """Top-1 accuracy (0..1) of ``model`` on a :class:`~skipconv.sw.data.Split`."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(split), batch):
            correct += int((model(split.x[i:i + batch]).argmax(1) == split.y[i:i + batch]).sum())
    return correct / max(1, len(split))


def train(model: nn.Module, split, spec: TrainSpec, *, progress: bool = True,
          desc: str = "train") -> nn.Module:
    """Train ``model`` on ``split`` with Adam and a cosine schedule; return it in eval mode."""
    from tqdm import tqdm

    torch.manual_seed(spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    steps_per_epoch = (len(split) + spec.batch - 1) // spec.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr,
                                                total_steps=spec.epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    with tqdm(total=spec.epochs * steps_per_epoch, desc=desc, disable=not progress,
              leave=False) as bar:
        for _ in range(spec.epochs):
            perm = torch.randperm(len(split), generator=gen)
            for i in range(0, len(split), spec.batch):
                idx = perm[i:i + spec.batch]
                opt.zero_grad()
                loss = loss_fn(model(split.x[idx]), split.y[idx])
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def _path(name: str) -> tuple[Path, TrainSpec]:
    from .data import mnist_split

    spec = MODELS[name][1] if name in MODELS else None
    if spec is None:
        build(name)   # raises the error naming the model
    key = _key(name, spec, mnist_split("train").digest)
    return cache_dir("zoo") / f"{name}-{key}.pt", spec


def get_model(name: str, *, progress: bool = True) -> nn.Module:
    """Zoo model ``name``, trained, in eval mode (from the cache, or trained and cached)."""
    from .data import mnist_split

    path, spec = _path(name)
    model = build(name)
    if not path.exists():
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)          # another process may be training it
            try:
                if not path.exists():
                    with _threads():
                        t0 = time.monotonic()
                        # The initial weights too come from the seed, not from whatever drew
                        # random numbers in this process before.
                        torch.manual_seed(spec.seed)
                        model = build(name)
                        train(model, mnist_split("train"), spec, progress=progress,
                              desc=f"train {name}")
                        seconds = time.monotonic() - t0
                        info = {"name": name, "train_seconds": round(seconds, 1),
                                "test_top1": evaluate(model, mnist_split("test")),
                                "spec": asdict(spec), "zoo": ZOO_VERSION}
                    buf = io.BytesIO()
                    torch.save({"state_dict": model.state_dict(), "info": info}, buf)
                    atomic_write_bytes(path, buf.getvalue())
                    return model
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def model_info(name: str) -> dict:
    """Training record of a cached zoo model (seconds, test top-1); trains it if needed."""
    path, _ = _path(name)
    if not path.exists():
        get_model(name)
    return torch.load(path, map_location="cpu", weights_only=True)["info"]
