"""PyTorch export: a float ``nn.Module`` -> engine layers + the rest in torch (docs/export.md).

:func:`export` traces the model with ``torch.fx``, folds every ``BatchNorm2d`` into the
conv before it, and replaces each Conv2d(+BN)+ReLU the engine can run by one
:class:`EngineStage`. A calibration batch fixes the activation scales, and each stage becomes
a quantized :class:`~skipconv.sw.layer.Layer` (rules in :mod:`skipconv.sw.quant`). Every other
conv stays in torch, listed in ``ExportedNet.skipped`` with the reason.

The integer network (:meth:`ExportedNet.forward_int`) passes integer tensors from one engine
layer to the next through int-exact ops (max-pooling, flatten, identity, ReLU); any other op
dequantizes (``q * s``) and runs in float, and an engine layer fed by float requantizes its
input with its own calibrated scale.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import io
import json
import operator
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from . import layer as layer_mod
from .layer import Layer, atomic_write_bytes
from .quant import (act_scale, fold_bn, quantize_act, quantize_bias, quantize_weights,
                    requant_params)

__all__ = ["EngineStage", "ExportedNet", "ExportError", "export", "golden_conv", "dense_conv",
           "load", "load_module_spec", "engine_reasons", "fold_model", "MANIFEST_FORMAT",
           "MANIFEST_VERSION"]

MANIFEST_FORMAT = "skipconv-net"
MANIFEST_VERSION = 1


class ExportError(ValueError):
    """The model or an exported directory cannot be exported / loaded; says what and why."""


# -- what the engine can run -------------------------------------------------------------------

_RELU_FUNCS = {F.relu, torch.relu, torch.relu_, F.relu_}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_OTHER_ACTS = (nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Sigmoid,
               nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus)


def engine_reasons(conv: nn.Module) -> list[str]:
    """Why the engine cannot run this conv's geometry (empty list: it can)."""
    if type(conv) is not nn.Conv2d:
        return [f"{type(conv).__name__} is not a plain Conv2d"]
    reasons = []
    k, s, d = conv.kernel_size, conv.stride, conv.dilation
    if k[0] != k[1]:
        reasons.append(f"non-square kernel {tuple(k)} (the engine has K x K)")
    if s[0] != s[1]:
        reasons.append(f"stride {tuple(s)} differs between rows and columns")
    if tuple(d) != (1, 1):
        reasons.append(f"dilation {tuple(d)} (the engine has dilation 1)")
    if conv.groups != 1:
        reasons.append(f"groups = {conv.groups} (the engine has groups = 1)")
    if conv.padding_mode != "zeros":
        reasons.append(f"padding_mode = {conv.padding_mode!r} (the engine pads with zeros)")
    pad = _pad_of(conv)
    if pad is None:
        reasons.append(f"padding {conv.padding!r} is not symmetric and equal on both axes")
    elif k[0] == k[1] and pad > k[0] - 1:
        reasons.append(f"padding {pad} >= kernel size {k[0]}")
    return reasons


def _pad_of(conv: nn.Conv2d) -> int | None:
    p = conv.padding
    if p == "valid":
        return 0
    if p == "same":
        k = conv.kernel_size
        ok = k[0] == k[1] and k[0] % 2 == 1 and tuple(conv.stride) == (1, 1)
        return k[0] // 2 if ok else None
    return int(p[0]) if p[0] == p[1] else None


def _is_relu(node: torch.fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCS
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return False


def _describe(node: torch.fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def _no_relu_reason(after: torch.fx.Node, modules: dict) -> str | None:
    """Why the output of ``after`` (conv or its BN) does not go into a lone ReLU; None if it does."""
    users = list(after.users)
    if len(users) != 1:
        return (f"no ReLU: its output has {len(users)} users" if users
                else "no ReLU: its output is unused")
    user = users[0]
    if _is_relu(user, modules):
        return None
    if user.op == "call_module" and isinstance(modules[user.target], _OTHER_ACTS):
        return f"followed by {type(modules[user.target]).__name__}, not ReLU"
    if user.op in ("call_function", "call_method") and user.target in _ADD_FUNCS | {"add", "add_"}:
        return "conv without ReLU: its output feeds an add (residual), not a ReLU"
    if user.op == "output":
        return "conv without ReLU: it is the network's output"
    return f"conv without ReLU: followed by {_describe(user, modules)}"


# -- int-exact ops -----------------------------------------------------------------------------

_TRANSPARENT_MODULES = (nn.MaxPool2d, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten, nn.ReLU)
_TRANSPARENT_FUNCS = {F.max_pool2d, torch.max_pool2d, torch.flatten, F.relu, torch.relu,
                      F.dropout}
_TRANSPARENT_METHODS = {"flatten", "view", "reshape", "contiguous", "relu"}


def _transparent(node: torch.fx.Node, modules: dict) -> bool:
    """Whether ``node`` maps non-negative integers to the same integers exactly (scale kept)."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.MaxPool2d):
            return not m.return_indices
        return isinstance(m, _TRANSPARENT_MODULES)
    if node.op == "call_function":
        if node.target in (F.max_pool2d, torch.max_pool2d):
            return not node.kwargs.get("return_indices", False)
        return node.target in _TRANSPARENT_FUNCS
    if node.op == "call_method":
        return node.target in _TRANSPARENT_METHODS
    return False


# -- graph preparation -------------------------------------------------------------------------

class EngineStage(nn.Module):
    """One engine layer in float form: the BN-folded conv followed by ReLU."""

    def __init__(self, conv: nn.Conv2d, source: str):
        super().__init__()
        self.conv = conv
        self.source = source

    def forward(self, x):
        return torch.relu(self.conv(x))


@dataclass
class _ConvInfo:
    name: str                 # module name in the source model
    stage: str | None         # EngineStage target in the prepared graph (engine layers)
    reason: str | None        # why it stays in torch (skipped convs)


def fold_model(model: nn.Module) -> tuple[torch.fx.GraphModule, list[_ConvInfo]]:
    """Trace ``model``, fold BN into convs and wrap engine-runnable Conv(+BN)+ReLU in stages.

    Returns the prepared ``GraphModule`` (eval mode, float, equal to ``model`` up to float
    rounding) and every conv in graph order with its fate.
    """
    model = copy.deepcopy(model).eval()
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:   # noqa: BLE001 - fx raises many types; say what failed
        raise ExportError(f"torch.fx cannot trace {type(model).__name__}: {e}") from e
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1

    convs: list[_ConvInfo] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.Conv2d):
            continue
        conv = modules[node.target]
        name = node.target
        if calls[name] > 1:
            convs.append(_ConvInfo(name, None, f"module called {calls[name]} times (shared)"))
            continue
        after, bn_node = node, None
        users = list(node.users)
        if (len(users) == 1 and users[0].op == "call_module"
                and isinstance(modules[users[0].target], nn.BatchNorm2d)
                and calls[users[0].target] == 1):
            bn_node = users[0]
            conv = fold_bn(conv, modules[bn_node.target])
            after = bn_node
        reasons = engine_reasons(conv)
        no_relu = _no_relu_reason(after, modules)
        if no_relu:
            reasons.append(no_relu)
        if reasons:
            # Stays in torch (BN folded all the same: equal in eval mode).
            if bn_node is not None:
                _set_module(gm, name, conv)
                bn_node.replace_all_uses_with(node)
                gm.graph.erase_node(bn_node)
            convs.append(_ConvInfo(name, None, "; ".join(reasons)))
            continue
        relu_node = next(iter(after.users))
        stage = f"engine_{len(convs)}_" + name.replace(".", "_")
        gm.add_submodule(stage, EngineStage(conv, name))
        with gm.graph.inserting_after(relu_node):
            new = gm.graph.call_module(stage, (node.args[0],))
        relu_node.replace_all_uses_with(new)
        for dead in (relu_node, bn_node, node):
            if dead is not None:
                gm.graph.erase_node(dead)
        convs.append(_ConvInfo(name, stage, None))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval(), convs


def _set_module(gm: nn.Module, qualname: str, new: nn.Module) -> None:
    parent, _, leaf = qualname.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, new)


def _input_sources(gm: torch.fx.GraphModule, stage_index: dict) -> dict:
    """node -> engine index whose integers reach it through int-exact ops only (else absent)."""
    modules = dict(gm.named_modules())
    src = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target in stage_index:
            src[n] = stage_index[n.target]
        elif _transparent(n, modules) and n.args and isinstance(n.args[0], torch.fx.Node):
            if n.args[0] in src:
                src[n] = src[n.args[0]]
    return src


# -- integer values flowing through the graph --------------------------------------------------

@dataclass
class _IntAct:
    """Integers (float64 tensor holding exact integers) with their scale and producing layer."""

    q: torch.Tensor
    scale: float
    src: int

    def deq(self) -> torch.Tensor:
        return (self.q * self.scale).float()


def _deq(v):
    return v.deq() if isinstance(v, _IntAct) else v


class _Runner(torch.fx.Interpreter):
    """Evaluates the prepared graph with engine stages run by ``conv`` on integers."""

    def __init__(self, net: "ExportedNet", conv, record: list | None):
        super().__init__(net.gm)
        self.net, self.conv, self.record = net, conv, record
        self.modules = dict(net.gm.named_modules())

    def run_node(self, n):
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if n.op == "call_module" and n.target in self.net._stage_index:
                return self.net._run_stage(self.net._stage_index[n.target], args[0], self.conv,
                                           self.record)
            first = args[0] if args else None
            rest_int = _has_int((args[1:], kwargs))
            if isinstance(first, _IntAct) and not rest_int and _transparent(n, self.modules):
                out = getattr(self, n.op)(n.target, (first.q, *args[1:]), kwargs)
                return _IntAct(out, first.scale, first.src)
            args = torch.fx.node.map_aggregate(args, _deq)
            kwargs = torch.fx.node.map_aggregate(kwargs, _deq)
            return getattr(self, n.op)(n.target, args, kwargs)


def _has_int(tree) -> bool:
    found = []
    torch.fx.node.map_aggregate(tree, lambda a: found.append(isinstance(a, _IntAct)) or a)
    return any(found)


class _Calibrator(torch.fx.Interpreter):
    """Float run recording each stage's input range and output maximum, and conv shapes."""

    def __init__(self, gm, stage_index):
        super().__init__(gm)
        self.stage_index = stage_index
        self.stats: dict[int, dict] = {}
        self.shapes: dict[str, tuple] = {}
        self.modules = dict(gm.named_modules())

    def call_module(self, target, args, kwargs):
        out = super().call_module(target, args, kwargs)
        m = self.modules[target]
        if target in self.stage_index:
            x = args[0].detach()
            s = self.stats.setdefault(self.stage_index[target],
                                      {"min": np.inf, "max": -np.inf, "out_max": 0.0})
            s["min"] = min(s["min"], float(x.min()))
            s["max"] = max(s["max"], float(x.max()))
            s["out_max"] = max(s["out_max"], float(out.detach().max()))
            s["in_shape"] = tuple(x.shape[1:])
            self.shapes[m.source] = (tuple(x.shape[1:]), tuple(out.shape[1:]))
        elif isinstance(m, nn.Conv2d):
            self.shapes[target] = (tuple(args[0].shape[1:]), tuple(out.shape[1:]))
        return out


# -- per-layer callables -----------------------------------------------------------------------

def golden_conv(layer: Layer, x_int, g: int = 1) -> np.ndarray:
    """Run ``layer`` on ``x_int`` ((N, Cin, H, W) or (Cin, H, W)) with the golden model."""
    from . import golden

    return golden.run(layer, np.asarray(x_int, np.int64), g).out


def dense_conv(layer: Layer, x_int) -> np.ndarray:
    """Fast exact path for a layer with no skip mechanism: float64 ``conv2d`` then ``q``.

    Equal to the golden model for such layers (semantics.md section 6, all features off);
    refuses a layer that uses a skip mechanism.
    """
    from .golden import requantize

    if layer.features:
        raise ValueError(f"layer {layer.name!r} uses {sorted(layer.features)}: dense_conv "
                         "only runs layers with every skip mechanism off")
    x = np.asarray(x_int, np.int64)
    single = x.ndim == 3
    xb = torch.from_numpy((x[None] if single else x).astype(np.float64))
    acc = F.conv2d(xb, torch.from_numpy(np.asarray(layer.w, np.float64)),
                   torch.from_numpy(np.asarray(layer.b, np.float64)),
                   stride=layer.stride, padding=layer.pad).numpy()
    acc = np.rint(acc).astype(np.int64).transpose(1, 0, 2, 3)          # channels first
    if layer.raw:
        out = np.maximum(acc, 0)
    else:
        cout = layer.cout
        M = np.ones(cout, np.int64) if layer.M is None else np.asarray(layer.M, np.int64)
        sh = np.zeros(cout, np.int64) if layer.sh is None else np.asarray(layer.sh, np.int64)
        out = requantize(acc, M, sh, layer.out_bits)
    out = out.transpose(1, 0, 2, 3)
    return out[0] if single else out


# -- the exported network ----------------------------------------------------------------------

class ExportedNet:
    """Engine layers plus the torch graph around them.

    Attributes
    ----------
    layers : list of Layer
        Engine layers in execution order. ``layer.meta`` holds ``s_x``, ``s_w`` (list),
        ``s_y``, ``source`` (module name in the float model), ``stage`` and ``input_from``
        (index of the engine layer whose integers this layer takes unchanged, or ``None`` when
        it quantizes a float tensor with ``s_x``).
    skipped : list of (name, reason)
        Convs that stay in PyTorch.
    gm : torch.fx.GraphModule
        The prepared float graph (BN folded, engine stages as :class:`EngineStage`).
    model : nn.Module
        The float model as given (its ``state_dict`` is saved with the network).
    """

    def __init__(self, model, gm, convs, layers, spec=None, shapes=None):
        self.model = model
        self.gm = gm
        self.convs = convs
        self.layers = list(layers)
        self.spec = spec or {}
        self.shapes = shapes or {}
        self._stage_index = {c.stage: i for i, c in
                             enumerate(c for c in convs if c.stage is not None)}

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return [(c.name, c.reason) for c in self.convs if c.stage is None]

    def with_layers(self, layers) -> "ExportedNet":
        """A copy running ``layers`` (e.g. configured by a method) instead of :attr:`layers`.

        Each replacement must have the exported layer's input shape and weight shape; a
        replacement without scales in ``meta`` takes the exported layer's.
        """
        layers = list(layers)
        if len(layers) != len(self.layers):
            raise ExportError(f"layers: {len(layers)} given; the network has "
                              f"{len(self.layers)} engine layers")
        out = []
        for i, (new, old) in enumerate(zip(layers, self.layers)):
            if tuple(new.in_shape) != tuple(old.in_shape) or new.w.shape != old.w.shape:
                raise ExportError(f"layers[{i}] ({new.name!r}): in_shape {tuple(new.in_shape)}"
                                  f" / w.shape {new.w.shape} differ from the exported "
                                  f"{tuple(old.in_shape)} / {old.w.shape}")
            new.validate()
            if any(k not in new.meta for k in ("s_x", "s_y", "input_from")):
                new = dataclasses.replace(new, meta={**old.meta, **new.meta})
            out.append(new)
        return ExportedNet(self.model, self.gm, self.convs, out, self.spec, self.shapes)

    # -- evaluation ------------------------------------------------------------------------

    def forward_float(self, x) -> torch.Tensor:
        """The prepared float network (BN folded): equals the source model in eval mode."""
        with torch.no_grad():
            return self.gm(torch.as_tensor(x, dtype=torch.float32))

    def forward_int(self, x, conv=golden_conv, *, batch: int | None = None,
                    progress: bool = False) -> torch.Tensor:
        """Evaluate the integer network on float images ``x`` (N, C, H, W); return logits.

        ``conv(layer, x_int) -> out_int`` runs each engine layer; it is called once per
        engine layer per chunk of ``batch`` images (default: all of ``x`` at once) with
        ``x_int`` a NumPy int64 array (n, Cin, H, W) and must return (n, Cout, Ho, Wo)
        integers. ``layer`` is the very object in :attr:`layers`. Default: the golden model.
        """
        return self._forward(x, conv, batch, None, progress)[0]

    def layer_inputs(self, x, conv=golden_conv, *, batch: int | None = None,
                     progress: bool = False) -> list[np.ndarray]:
        """The integer input (N, Cin, H, W) int64 of every engine layer for float images ``x``."""
        return self._forward(x, conv, batch, [], progress)[1]

    def _forward(self, x, conv, batch, record, progress):
        from tqdm import tqdm

        x = torch.as_tensor(x, dtype=torch.float32)
        n = x.shape[0]
        batch = batch or max(1, n)
        logits, rec = [], [[] for _ in self.layers]
        with torch.no_grad():
            for i in tqdm(range(0, n, batch), desc="integer network", disable=not progress,
                          leave=False):
                chunk_rec = [] if record is not None else None
                logits.append(_deq(_Runner(self, conv, chunk_rec).run(x[i:i + batch])))
                if chunk_rec is not None:
                    for j, xi in chunk_rec:
                        rec[j].append(xi)
        ins = [np.concatenate(r) if r else None for r in rec] if record is not None else None
        return torch.cat(logits), ins

    def _run_stage(self, i, v, conv, record):
        L = self.layers[i]
        src = L.meta.get("input_from")
        if isinstance(v, _IntAct) and src is not None and v.src == src:
            x_int = v.q.numpy().astype(np.int64)
        else:
            x_int = quantize_act(_deq(v), L.meta["s_x"], L.act_bits, L.act_signed)
        if record is not None:
            record.append((i, x_int))
        out = np.asarray(conv(L, x_int))
        want = (x_int.shape[0], *L.out_shape)
        if out.shape != want:
            raise ExportError(f"conv({L.name!r}) returned shape {out.shape}; expected {want}")
        return _IntAct(torch.from_numpy(out.astype(np.float64)), L.meta["s_y"], i)

    def evaluate(self, split, conv=None, *, batch: int = 250, progress: bool = False) -> dict:
        """Top-1 of the float and the integer network on a split (``conv``: default golden)."""
        with torch.no_grad():
            fl = (self.forward_float(split.x).argmax(1) == split.y).float().mean().item()
        logits = self.forward_int(split.x, conv or golden_conv, batch=batch, progress=progress)
        it = (logits.argmax(1) == split.y).float().mean().item()
        return {"float_top1": fl, "int_top1": it}

    # -- files -----------------------------------------------------------------------------

    def write_case(self, layer_index: int, x_int, path) -> None:
        """Write engine layer ``layer_index`` with input ``x_int`` (Cin, H, W) as a case file."""
        if not 0 <= layer_index < len(self.layers):
            raise ExportError(f"layer_index = {layer_index!r}: the network has "
                              f"{len(self.layers)} engine layers")
        layer_mod.save_case(path, self.layers[layer_index], np.asarray(x_int, np.int64))

    def table(self) -> list[dict]:
        """One row per conv in graph order: name, engine index or None, shapes, reason."""
        rows, idx = [], 0
        for c in self.convs:
            in_s, out_s = self.shapes.get(c.name, (None, None))
            row = {"name": c.name, "engine": None, "in_shape": in_s, "out_shape": out_s,
                   "reason": c.reason}
            if c.stage is not None:
                L = self.layers[idx]
                row.update(engine=idx, in_shape=tuple(L.in_shape), out_shape=L.out_shape,
                           k=L.k, stride=L.stride, pad=L.pad, signed=L.act_signed,
                           dense_macs=L.dense_macs)
                idx += 1
            rows.append(row)
        return rows

    def save(self, folder) -> None:
        """Write one layer package per engine layer, the float weights and ``manifest.json``.

        The manifest is written last, so a folder without one is an interrupted save.
        """
        folder = Path(folder)
        (folder / "layers").mkdir(parents=True, exist_ok=True)
        files = []
        for i, L in enumerate(self.layers):
            rel = f"layers/{i:02d}-{L.name.replace('.', '_') or 'layer'}.npz"
            layer_mod.save(folder / rel, L)
            files.append(rel)
        buf = io.BytesIO()
        torch.save(self.model.state_dict(), buf)
        atomic_write_bytes(folder / "model.pt", buf.getvalue())
        model_spec = dict(self.spec)
        if "zoo" not in model_spec and "module" not in model_spec:
            buf = io.BytesIO()
            torch.save(self.model, buf)                  # whole module: its class must import
            atomic_write_bytes(folder / "model_full.pt", buf.getvalue())
            model_spec = {"pickle": "model_full.pt"}
        manifest = {
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "model": model_spec,
            "state_dict": "model.pt",
            "layers": [{"file": f, "name": L.name, "stage": L.meta.get("stage"),
                        "in_shape": list(L.in_shape), "out_shape": list(L.out_shape)}
                       for f, L in zip(files, self.layers)],
            "convs": [{"name": c.name, "stage": c.stage, "reason": c.reason} for c in self.convs],
            "shapes": {k: [list(a), list(b)] for k, (a, b) in self.shapes.items()},
        }
        atomic_write_bytes(folder / "manifest.json",
                           json.dumps(manifest, indent=2).encode())


def load_module_spec(spec: str) -> nn.Module:
    """``"path/to/file.py:factory"`` -> ``factory()`` (a user's own module)."""
    path, sep, factory = spec.rpartition(":")
    if not sep or not path or not factory:
        raise ExportError(f"module = {spec!r}: must be 'file.py:factory'")
    if not os.path.isfile(path):
        raise ExportError(f"module = {spec!r}: no file {path!r}")
    mod_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    fn = getattr(mod, factory, None)
    if not callable(fn):
        raise ExportError(f"module = {spec!r}: {path!r} has no callable {factory!r}")
    model = fn()
    if not isinstance(model, nn.Module):
        raise ExportError(f"module = {spec!r}: {factory}() returned {type(model).__name__}, "
                          "not a torch.nn.Module")
    return model


def _stage_layer(i, conv_info, stage: EngineStage, stats, src, prev_layers, bits) -> Layer:
    act_bits, weight_bits, out_bits = bits
    conv = stage.conv
    if src is not None:
        s_x, signed = prev_layers[src].meta["s_y"], False
    else:
        signed = stats["min"] < 0
        amax = max(abs(stats["min"]), abs(stats["max"])) if signed else max(stats["max"], 0.0)
        s_x = act_scale(amax, act_bits, signed)
    w = conv.weight.detach().double().numpy()
    b = (conv.bias.detach().double().numpy() if conv.bias is not None
         else np.zeros(w.shape[0]))
    wq, s_w = quantize_weights(w, weight_bits)
    s_y = act_scale(stats["out_max"], out_bits, False)
    bq = quantize_bias(b, s_x, s_w)
    M, sh = requant_params(s_x * s_w / s_y)
    return Layer(in_shape=stats["in_shape"], w=wq, b=bq, stride=int(conv.stride[0]),
                 pad=_pad_of(conv), M=M, sh=sh, out_bits=out_bits, act_bits=act_bits,
                 weight_bits=weight_bits, act_signed=bool(signed), name=conv_info.name,
                 meta={"s_x": float(s_x), "s_w": [float(v) for v in s_w], "s_y": float(s_y),
                       "source": conv_info.name, "stage": conv_info.stage,
                       "input_from": src, "engine_index": i})


def export(model: nn.Module, calib, *, config=None, act_bits: int | None = None,
           weight_bits: int | None = None, out_bits: int | None = None,
           spec: dict | None = None) -> ExportedNet:
    """Export ``model`` with activation scales from the float batch ``calib`` (N, C, H, W).

    Bit widths come from ``config`` (an :class:`~skipconv.sw.config.EngineConfig`, default
    8/8/8) unless given. ``spec`` says how to rebuild the float model when loading a saved
    network: ``{"zoo": name}`` or ``{"module": "file.py:factory"}`` (default: the whole
    module is pickled by :meth:`ExportedNet.save`).
    """
    from .config import EngineConfig

    cfg = config or EngineConfig()
    bits = (act_bits or cfg.act_bits, weight_bits or cfg.weight_bits, out_bits or cfg.out_bits)
    calib = torch.as_tensor(calib, dtype=torch.float32)
    if calib.ndim != 4 or calib.shape[0] < 1:
        raise ExportError(f"calib.shape = {tuple(calib.shape)}: must be (N, C, H, W), N >= 1")
    model = model.eval()
    gm, convs = fold_model(model)
    net = ExportedNet(model, gm, convs, [], spec)
    cal = _Calibrator(gm, net._stage_index)
    with torch.no_grad():
        cal.run(calib)
    net.shapes = cal.shapes
    sources = _input_sources(gm, net._stage_index)
    stage_nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"
                   and n.target in net._stage_index}
    modules = dict(gm.named_modules())
    engine = [c for c in convs if c.stage is not None]
    for i, c in enumerate(engine):
        node = stage_nodes[c.stage]
        arg = node.args[0]
        src = sources.get(arg) if isinstance(arg, torch.fx.Node) else None
        if i not in cal.stats:
            raise ExportError(f"engine layer {c.name!r} did not run on the calibration batch")
        net.layers.append(_stage_layer(i, c, modules[c.stage], cal.stats[i], src, net.layers,
                                       bits))
    for L in net.layers:
        L.validate()
    return net


def load(folder) -> ExportedNet:
    """Read a network written by :meth:`ExportedNet.save` (layers validated, checksummed)."""
    folder = Path(folder)
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise ExportError(f"manifest = {os.fspath(mpath)!r}: missing (not an exported network, "
                          "or an interrupted save)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"manifest = {os.fspath(mpath)!r}: not JSON ({e})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ExportError(f"manifest.format = {manifest.get('format')!r}: must be "
                          f"{MANIFEST_FORMAT!r}")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ExportError(f"manifest.version = {manifest.get('version')!r}: this skipconv reads "
                          f"version {MANIFEST_VERSION}")
    spec = manifest["model"]
    if "zoo" in spec:
        from .zoo import build
        model = build(spec["zoo"])
    elif "module" in spec:
        model = load_module_spec(spec["module"])
    elif "pickle" in spec:
        model = torch.load(folder / spec["pickle"], map_location="cpu", weights_only=False)
    else:
        raise ExportError(f"manifest.model = {spec!r}: names no way to rebuild the model")
    state = torch.load(folder / manifest["state_dict"], map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    gm, convs = fold_model(model)
    stages = [c.stage for c in convs if c.stage is not None]
    want = [e["stage"] for e in manifest["layers"]]
    if stages != want:
        raise ExportError(f"manifest.layers stages = {want!r}: the rebuilt model has {stages!r}")
    layers = [layer_mod.load(folder / e["file"]) for e in manifest["layers"]]
    modules = dict(gm.named_modules())
    for L, st in zip(layers, stages):
        w = modules[st].conv.weight
        if tuple(L.w.shape) != tuple(w.shape):
            raise ExportError(f"layer {L.name!r}: w.shape = {L.w.shape}, the model's conv has "
                              f"{tuple(w.shape)}")
        for key in ("s_x", "s_y", "input_from"):
            if key not in L.meta:
                raise ExportError(f"layer {L.name!r}: meta.{key} is missing")
    shapes = {k: (tuple(a), tuple(b)) for k, (a, b) in manifest.get("shapes", {}).items()}
    return ExportedNet(model, gm, convs, layers, spec if "pickle" not in spec else {}, shapes)
