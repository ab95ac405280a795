"""Fine-tuning with perforation in the forward pass (PerforatedCNNs, NIPS 2016, Sec. 3.3).

The float model is trained further on its training images with every engine layer's conv
output perforated by a fixed mask (nearest-neighbour copies, exactly the COPY semantics of
docs/semantics.md, which commutes with the per-channel BN and ReLU after the conv): the
masks are not trained, backpropagation is otherwise unchanged. The masks come from a
per-layer *ladder* (nested masks of growing rate, index 0 = nothing perforated) and each
mini-batch draws one rung per layer uniformly, so the network learns to tolerate every rung
of every ladder at once instead of one configuration chosen beforehand (no configuration
has to be chosen before the joint search, which then runs on the fine-tuned network with
the very same masks).

BatchNorm keeps its running statistics (the model stays in eval mode): the dense network
and the lightly perforated rungs see the same normalization as before.

The result is a new float model; it is exported again (its own integer scales) and every
number reported for it comes, as always, from golden execution of the exported layers.
Accuracy drops are measured against the *original* dense network and MAC reductions against
its dense MACs (the shapes are unchanged, so the dense MACs are too).
"""

from __future__ import annotations

import copy

import numpy as np

from .perforation import _conv_modules, nn_table

__all__ = ["perforation_finetune", "FINETUNE_EPOCHS", "FINETUNE_LR"]

#: Fine-tuning length and learning rate (AdamW, cosine decay to 0), lenet on 3,500 images.
FINETUNE_EPOCHS = 4
FINETUNE_LR = 5e-4


def perforation_finetune(model, layers, ladders, x, y, *, epochs: int = FINETUNE_EPOCHS,
                         lr: float = FINETUNE_LR, batch: int = 64, weight_decay: float = 1e-4,
                         seed: int = 0, distill: float = 0.0, temperature: float = 4.0,
                         progress: bool = True):
    """A copy of ``model`` fine-tuned on ``(x, y)`` with random rungs of ``ladders``.

    ``ladders[i]`` is the list of ``(Ho, Wo)`` bool masks of engine layer ``i`` (``layers``
    in execution order, matched to the model's convs as :func:`perforation.impacts` does);
    index 0 should be the empty mask so that the unperforated layer keeps being trained.
    Deterministic for a given ``seed`` (one intra-op thread, like the zoo's training).
    """
    import torch

    teacher = model
    model = copy.deepcopy(model)
    mods = _conv_modules(model, layers)
    tables = [[None if not np.asarray(m).any() else torch.as_tensor(nn_table(m))
               for m in lad] for lad in ladders]
    current = [None] * len(mods)
    hooks = []

    def make_hook(i):
        def hook(mod, inp, out):
            nn = current[i]
            return out if nn is None else out[:, :, nn[..., 0], nn[..., 1]]
        return hook

    rng = np.random.default_rng(seed)

    def draw_rungs():
        for i, tab in enumerate(tables):
            current[i] = tab[int(rng.integers(len(tab)))] if tab else None

    for i, m in enumerate(mods):
        hooks.append(m.register_forward_hook(make_hook(i)))
    try:
        _fit(model, teacher, x, y, epochs=epochs, lr=lr, batch=batch,
             weight_decay=weight_decay, seed=seed, distill=distill, temperature=temperature,
             before_batch=draw_rungs, desc="fine-tune (perforated)", progress=progress)
    finally:
        for h in hooks:
            h.remove()
    return model.eval()


def _fit(model, teacher, x, y, *, epochs, lr, batch, weight_decay, seed, distill,
         temperature, before_batch=None, desc="fine-tune", progress=True):
    """Train ``model`` in place: AdamW, cosine decay to 0, seeded batches, one thread.

    The model stays in eval mode: BN keeps its running statistics (the dense network and
    the skipping forward pass see the normalization they were exported with; the zoo has no
    dropout). ``distill`` > 0 mixes in the KL divergence to ``teacher``'s softened outputs.
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps = epochs * ((len(y) + batch - 1) // batch)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
        model.eval()
        with tqdm(total=steps, desc=desc, disable=not progress, leave=False) as bar:
            for _ in range(epochs):
                perm = torch.randperm(len(y), generator=gen)
                for s in range(0, len(y), batch):
                    idx = perm[s:s + batch]
                    if before_batch is not None:
                        before_batch()
                    opt.zero_grad()
                    z = model(x[idx])
                    loss = F.cross_entropy(z, y[idx])
                    if distill:
                        with torch.no_grad():
                            zt = teacher(x[idx])
                        T = temperature
                        kd = F.kl_div(F.log_softmax(z / T, 1), F.softmax(zt / T, 1),
                                      reduction="batchmean") * T * T
                        loss = (1 - distill) * loss + distill * kd
                    loss.backward()
                    opt.step()
                    sched.step()
                    bar.update(1)
    finally:
        torch.set_num_threads(threads)
    for p in model.parameters():
        p.grad = None
    return model
