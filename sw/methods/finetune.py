"""Training the float model further with a skip method in the forward pass.

* :func:`perforation_finetune`: PerforatedCNNs (NIPS 2016, Sec. 3.3), below;
* :func:`zero_pred_retrain`: zero prediction (Shomron & Weiser 2018, Sec. 2.4; the 2019
  report, Sec. 7.2): the layer's post-ReLU output with every predicted follower set to 0,
  exactly the predicted-zero rule of docs/semantics.md section 3, the decision not trained.

Fine-tuning with perforation in the forward pass (PerforatedCNNs, NIPS 2016, Sec. 3.3):

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

__all__ = ["perforation_finetune", "FINETUNE_EPOCHS", "FINETUNE_LR", "relu_input_modules",
           "predicted_followers", "zero_pred_forward", "zero_pred_retrain", "RETRAIN_EPOCHS",
           "RETRAIN_LR", "plan_forward", "joint_retrain"]

#: Fine-tuning length and learning rate (AdamW, cosine decay to 0), lenet on 3,500 images.
FINETUNE_EPOCHS = 4
FINETUNE_LR = 5e-4
#: Zero-prediction retraining length and learning rate (the same optimizer and schedule).
RETRAIN_EPOCHS = 4
RETRAIN_LR = 1e-4


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


# -- retraining with the zero predictor in the forward pass ------------------------------------

def relu_input_modules(model, layers) -> list:
    """The float model's module whose output feeds each engine layer's ReLU.

    That is the BatchNorm2d after the layer's conv when there is one (the exporter folds it
    into the conv), else the conv itself: found by tracing ``model`` with ``torch.fx`` and
    following the conv named by the layer (``meta["source"]``, else ``name``) to its single
    user, as :func:`skipconv.sw.export.fold_model` does.
    """
    import torch.fx
    import torch.nn as nn

    gm = torch.fx.symbolic_trace(model)
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    out = []
    for L in layers:
        name = L.meta.get("source") or L.name
        node = nodes.get(name)
        if node is None or not isinstance(model.get_submodule(name), nn.Conv2d):
            raise ValueError(f"layer {L.name!r}: the float model has no Conv2d {name!r}")
        users = list(node.users)
        if (len(users) == 1 and users[0].op == "call_module"
                and isinstance(model.get_submodule(users[0].target), nn.BatchNorm2d)):
            name = users[0].target
        out.append(model.get_submodule(name))
    return out


def predicted_followers(v, p: int, leader, zero_below: float = 0.0):
    """Bool ``(N, C, H, W)``: the followers that zero prediction outputs as 0.

    ``leader`` is the ``(C, H, W)`` mask of ``p x p`` windows tiled from (0, 0). A leader is
    zero when ``v <= zero_below``: ``v`` the layer's output before or after its ReLU, 0 for
    the exact float rule or for the engine's integer outputs; the exported layer outputs 0
    below half its output step (``0.5 * s_y``: requantization rounds to nearest), which is
    what :class:`zero_pred_forward` uses so that training sees the windows the engine
    predicts. A window is predicted when every leader inside the ofmap is zero (positions
    outside do not exist and count as zero leaders, docs/semantics.md section 3); its
    followers are.
    """
    import torch

    leader = torch.as_tensor(np.asarray(leader, bool))
    n, c, h, w = v.shape
    hp, wp = -(-h // p) * p, -(-w // p) * p
    live = torch.zeros((n, c, hp, wp), dtype=torch.bool)
    live[:, :, :h, :w] = leader & (v.detach() > zero_below)
    win = ~live.view(n, c, hp // p, p, wp // p, p).any(dim=5).any(dim=3)
    full = win.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)[:, :, :h, :w]
    return full & ~leader


class _ForwardHooks:
    """Hooks put on the model by ``_register(i)`` for every configured layer ``i`` on
    ``__enter__``, all removed on ``__exit__``."""

    def __enter__(self):
        for i in sorted(set().union(*self.configs)):
            self._register(i)
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self._reset()
        return False

    def _reset(self):
        """Forget per-pass state when the hooks are removed."""


class zero_pred_forward(_ForwardHooks):
    """Context manager: the zero predictor of ``plan`` in ``model``'s forward pass.

    ``plan`` is ``{engine layer index: Layer}`` (``p``, ``leader`` and ``meta["s_y"]`` are
    used); each configured layer's ReLU input gets its predicted followers set to 0, so that
    after the ReLU the float layer outputs what the engine does with that predictor: leaders
    and unpredicted followers as computed, predicted followers 0. A leader counts as zero
    where the exported layer outputs 0 (``quantized``, the default: below ``0.5 * s_y``;
    else exactly where the float ReLU does). The decision is a constant of the forward
    pass (no gradient through it, the predictor is not trained); gradients flow unchanged
    through every other output. Layers that also hold CONST / COPY positions are refused
    (their float semantics is not this one's).

    ``plan`` may also be a list of plans: :attr:`current` (an index, default 0) says which
    one the forward pass applies (retraining draws one per mini-batch).
    """

    def __init__(self, model, layers, plan, *, quantized: bool = True):
        self.mods = relu_input_modules(model, layers)
        plans = [plan] if isinstance(plan, dict) else list(plan)
        self.configs = [self._targets(pl, quantized) for pl in plans]
        self.current = 0
        self.hooks = []
        #: per configured layer, the last forward pass's predicted followers (for tests)
        self.predicted = {}

    @staticmethod
    def _targets(plan, quantized):
        out = {}
        for i, L in plan.items():
            if not L.p:
                continue
            if L.kind is not None and np.asarray(L.kind).any():
                raise ValueError(f"layer {i} ({L.name!r}): zero prediction combined with "
                                 "CONST / COPY positions cannot be retrained here")
            below = 0.5 * float(L.meta["s_y"]) if quantized else 0.0
            out[i] = (int(L.p), np.asarray(L.leader, bool), below)
        return out

    def _hook(self, i):
        def hook(mod, inp, out):
            target = self.configs[self.current].get(i)
            if target is None:                  # this layer is dense in the current plan
                self.predicted.pop(i, None)
                return out
            pred = predicted_followers(out, *target)
            self.predicted[i] = pred
            return out.masked_fill(pred, 0.0)
        return hook

    def _register(self, i):
        self.hooks.append(self.mods[i].register_forward_hook(self._hook(i)))


def zero_pred_retrain(model, layers, plan, x, y, *, epochs: int = RETRAIN_EPOCHS,
                      lr: float = RETRAIN_LR, batch: int = 64, weight_decay: float = 1e-4,
                      seed: int = 0, distill: float = 0.0, temperature: float = 4.0,
                      quantized: bool = True, progress: bool = True):
    """A copy of ``model`` retrained on ``(x, y)`` with ``plan``'s predictor in the forward pass.

    The 2018 paper's Sec. 2.4 (and the 2019 report's Sec. 7.2): the same network, only with
    the predictor added; it is not trainable and backpropagation is otherwise unchanged.
    ``layers`` are the engine layers ``plan`` indexes (execution order). ``plan`` may be a
    list of plans: each mini-batch then draws one uniformly (seeded), as
    :func:`perforation_finetune` draws rungs, so that the network learns all of them.
    Deterministic for a given ``seed`` (one intra-op thread). The copy is exported again by
    the caller.
    """
    teacher = model
    model = copy.deepcopy(model)
    rng = np.random.default_rng(seed)
    with zero_pred_forward(model, layers, plan, quantized=quantized) as zp:

        def draw():
            if len(zp.configs) > 1:
                zp.current = int(rng.integers(len(zp.configs)))

        _fit(model, teacher, x, y, epochs=epochs, lr=lr, batch=batch,
             weight_decay=weight_decay, seed=seed, distill=distill, temperature=temperature,
             before_batch=draw, desc="retrain (zero prediction)", progress=progress)
    return model.eval()


# -- retraining with a joint configuration in the forward pass ---------------------------------

class plan_forward(_ForwardHooks):
    """Context manager: every skip of ``plan`` (any mix of the four methods) in ``model``'s
    forward pass, so that each configured float layer outputs what the engine layer does.

    At the module that feeds each configured layer's ReLU (:func:`relu_input_modules`), in
    the order of docs/semantics.md: (1) SnaPEA's predictive stop: COMPUTE positions whose
    partial sum after the ``spec[c]`` speculative taps of ``order[c]`` is ``<= th[c]`` output
    0 (the partial sum of the float layer with its BatchNorm folded in, as the exporter folds
    it, from the conv's input; ``th`` back in float units, ``th * s_x * s_w[c]`` of the
    exported layer the plan was configured on; exact termination never changes an output and
    needs nothing); (2) CONST positions (VELCRO) output their stored average, ``const *
    s_y``; (3) zero prediction: predicted COMPUTE followers output 0, leaders counted with
    their value after (1) and (2) (CONST leaders with their constant), zero below ``0.5 *
    s_y`` (:func:`predicted_followers`); (4) COPY positions (perforation) take the value of
    their NN target. All decisions are constants of the forward pass (no gradient through
    them; stopped, CONST and predicted positions pass none); COPY passes its gradient to its
    target, as :func:`perforation_finetune` does; everything else is unchanged.

    ``plan`` may be a list of plans: :attr:`current` (an index, default 0) says which one
    the forward pass applies.
    """

    def __init__(self, model, layers, plan):
        import torch.nn as nn

        self.model = model
        self.mods = relu_input_modules(model, layers)
        self.convs = [model.get_submodule(L.meta.get("source") or L.name) for L in layers]
        self.bns = [m if isinstance(m, nn.BatchNorm2d) else None for m in self.mods]
        plans = [plan] if isinstance(plan, dict) else list(plan)
        self.configs = [{i: self._target(L) for i, L in pl.items()} for pl in plans]
        self.current = 0
        self.hooks = []
        self._inputs = {}
        #: per configured layer, the last forward pass's positions by rule (for tests):
        #: ``{"stopped", "predicted"}`` bool tensors
        self.last = {}

    @staticmethod
    def _target(L):
        import torch

        t = {"s_y": float(L.meta["s_y"])}
        if L.kind is not None and np.asarray(L.kind).any():
            kind = np.asarray(L.kind)
            t["const"] = torch.as_tensor(kind == 1)
            t["const_v"] = torch.as_tensor(np.asarray(L.const, np.float64) * t["s_y"],
                                           dtype=torch.float32)
            t["compute"] = torch.as_tensor(kind == 0)
            if (kind == 2).any():
                t["copy"] = torch.as_tensor(kind == 2)
                t["nn"] = torch.as_tensor(np.asarray(L.nn, np.int64))
        if L.p:
            t["zp"] = (int(L.p), np.asarray(L.leader, bool), 0.5 * t["s_y"])
        if L.et == "predictive":
            cout, cin, k, _ = L.w.shape
            mask = np.zeros((cout, cin * k * k), np.float32)
            for c in range(cout):
                mask[c, np.asarray(L.order[c])[: int(L.spec[c])]] = 1.0
            th = (np.asarray(L.th, np.float64) * float(L.meta["s_x"])
                  * np.asarray(L.meta["s_w"], np.float64))
            t["spec_mask"] = torch.as_tensor(mask.reshape(cout, cin, k, k))
            t["th"] = torch.as_tensor(th, dtype=torch.float32)
        return t

    def _folded(self, i):
        """The conv's weight and bias with its BatchNorm folded in as the exporter folds it
        (:func:`..quant.fold_bn`; detached)."""
        import torch

        from ..quant import fold_bn

        conv, bn = self.convs[i], self.bns[i]
        if bn is not None:
            conv = fold_bn(conv, bn)
        w = conv.weight.detach()
        b = (conv.bias.detach() if conv.bias is not None
             else torch.zeros(w.shape[0], dtype=w.dtype))
        return w, b

    def _conv_hook(self, i):
        def hook(mod, inp):
            if i in self.configs[self.current] and "th" in self.configs[self.current][i]:
                self._inputs[i] = inp[0].detach()
        return hook

    def _hook(self, i):
        import torch
        import torch.nn.functional as F

        def hook(mod, inp, out):
            t = self.configs[self.current].get(i)
            if t is None:
                self.last.pop(i, None)
                return out
            v = out
            info = {}
            if "th" in t:
                conv = self.convs[i]
                w, b = self._folded(i)
                with torch.no_grad():
                    part = F.conv2d(self._inputs.pop(i), w * t["spec_mask"], b, conv.stride,
                                    conv.padding)
                stop = part <= t["th"].view(1, -1, 1, 1)
                if "compute" in t:
                    stop = stop & t["compute"]
                info["stopped"] = stop
                v = v.masked_fill(stop, 0.0)
            if "const" in t:
                v = torch.where(t["const"], t["const_v"].to(v.dtype), v)
            if "zp" in t:
                pred = predicted_followers(v, *t["zp"])
                if "compute" in t:
                    pred = pred & t["compute"]
                info["predicted"] = pred
                v = v.masked_fill(pred, 0.0)
            if "copy" in t:
                nn = t["nn"]
                v = torch.where(t["copy"], v[:, :, nn[..., 0], nn[..., 1]], v)
            self.last[i] = info
            return v
        return hook

    def _register(self, i):
        self.hooks.append(self.convs[i].register_forward_pre_hook(self._conv_hook(i)))
        self.hooks.append(self.mods[i].register_forward_hook(self._hook(i)))

    def _reset(self):
        self._inputs = {}


def joint_retrain(model, layers, plan, x, y, *, epochs: int = RETRAIN_EPOCHS,
                  lr: float = RETRAIN_LR, batch: int = 64, weight_decay: float = 1e-4,
                  seed: int = 0, distill: float = 0.0, temperature: float = 4.0,
                  progress: bool = True):
    """A copy of ``model`` retrained on ``(x, y)`` with ``plan``'s skips in the forward pass
    (:class:`plan_forward`; a list of plans: one drawn per mini-batch, seeded). The skip
    decisions are not trained; backpropagation is otherwise unchanged. ``distill`` > 0 mixes
    in the KL divergence to the original (dense) model's softened outputs. The caller
    exports it again."""
    teacher = model
    model = copy.deepcopy(model)
    rng = np.random.default_rng(seed)
    with plan_forward(model, layers, plan) as pf:

        def draw():
            if len(pf.configs) > 1:
                pf.current = int(rng.integers(len(pf.configs)))

        _fit(model, teacher, x, y, epochs=epochs, lr=lr, batch=batch,
             weight_decay=weight_decay, seed=seed, distill=distill, temperature=temperature,
             before_batch=draw, desc="retrain (joint)", progress=progress)
    return model.eval()
