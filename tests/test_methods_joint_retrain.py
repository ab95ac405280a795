"""Joint retraining: every skip of a joint configuration in the float forward pass (lenet).

The float emulation (``finetune.plan_forward``) must output what the engine layer does at
its CONST, COPY, predicted and stopped positions, train none of these decisions, and the
retrained network's ladders must put the same trajectory on the new layers.
"""

import re

import numpy as np
import pytest
import torch

from skipconv.sw import golden
from skipconv.sw.methods import finetune, joint, perforation, run, snapea, velcro, zero_pred
from skipconv.sw.methods.common import NetEval


def _plan(net, x):
    """conv1 predictive SnaPEA; conv2 VELCRO + perforation; conv3 VELCRO + zero prediction."""
    ev = NetEval(net, x, np.zeros(len(x), np.int64))
    bv = velcro.variance_tensors(ev)
    L0, L1, L2 = net.layers
    n = np.full(L0.cout, 3)
    th = np.zeros(L0.cout, np.int64)
    p0 = snapea.predictive(L0, n, th)
    rng = np.random.default_rng(0)
    p1 = perforation.apply(L1, rng.random(L1.out_hw) < 0.3)
    p1 = velcro.apply(p1, *bv[1], 0.2)
    p2 = zero_pred.diagonal(velcro.apply(L2, *bv[2], 0.2), 2)
    return {0: p0, 1: p1, 2: p2}


def _engine_outputs(model, net, plan, x, grad=False):
    """Per configured layer, the float output at its ReLU input with ``plan`` applied."""
    mods = finetune.relu_input_modules(model, net.layers)
    vs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, j=j: vs.__setitem__(j, o))
             for j, m in enumerate(mods)]
    xt = torch.as_tensor(x, dtype=torch.float32)
    try:
        with finetune.plan_forward(model, net.layers, plan) as pf:
            if grad:
                out = model(xt)
            else:
                with torch.no_grad():
                    out = model(xt)
    finally:
        for h in hooks:
            h.remove()
    return vs, pf.last, out


def test_const_copy_and_predicted_positions(lenet):
    model, net, splits = lenet
    x = splits["calib"].x[:16]
    plan = _plan(net, x)
    vs, last, _ = _engine_outputs(model, net, plan, x)
    L1, L2 = plan[1], plan[2]
    # The recording hooks were registered first: ``vs`` holds the raw outputs (upstream
    # layers emulated); apply the layer's own rules to them directly.
    mods = finetune.relu_input_modules(model, net.layers)
    pf = finetune.plan_forward(model, net.layers, plan)
    for i, L in ((1, L1), (2, L2)):
        v = vs[i]
        t = pf.configs[0][i]
        w = pf._hook(i)(mods[i], None, v)
        kind = np.asarray(L.kind)
        const = np.asarray(L.const) * L.meta["s_y"]
        wn = w.numpy()
        assert np.allclose(wn[:, kind == 1], const[kind == 1][None], atol=1e-6)
        if i == 1:
            nn = np.asarray(L.nn)
            ys, xs = np.nonzero(kind[0] == 2)
            for c in range(L.cout):
                for yy, xx in zip(ys, xs):
                    if kind[c, yy, xx] == 2:
                        ny, nx = nn[yy, xx]
                        assert wn[:, c, yy, xx].tolist() == wn[:, c, ny, nx].tolist()
        else:
            pred = pf.last[i]["predicted"].numpy()
            assert pred.any() and not (pred & (kind == 1)[None]).any()
            assert (wn[pred] == 0).all()
        assert "zp" not in t or i == 2


def test_predictive_stop_follows_the_integer_partial_sums(lenet):
    """The float stop decision (BN folded, threshold in float units) agrees with the golden
    model's predictive stops on almost every position (input quantization aside)."""
    model, net, splits = lenet
    x = splits["test"].x[:8]
    plan = _plan(net, x)
    _, last, _ = _engine_outputs(model, net, plan, x)
    got = last[0]["stopped"].numpy()
    L = plan[0]
    ins = net.layer_inputs(x)[0]
    want = np.stack([(golden.run(L, xi).outcome == golden.STOPPED)
                     & (golden.run(L, xi).macs == np.asarray(L.spec)[:, None, None])
                     for xi in ins])
    assert want.sum() > 1000
    assert (got != want).sum() < 0.02 * want.size, (int((got != want).sum()), want.size)


def test_no_gradient_through_skipped_positions(lenet):
    model, net, splits = lenet
    x = splits["calib"].x[:8]
    plan = _plan(net, x)
    vs, last, out = _engine_outputs(model, net, plan, x, grad=True)
    mods = finetune.relu_input_modules(model, net.layers)
    # Gradient of the logits w.r.t. conv2's emulated output at its CONST positions is the
    # gradient of a constant: zero reaching conv2's weights from those positions only.
    model.zero_grad()
    pf = finetune.plan_forward(model, net.layers, plan)
    v = vs[1].detach().requires_grad_(True)
    w = pf._hook(1)(mods[1], None, v)
    w.sum().backward()
    kind = np.asarray(plan[1].kind)
    g = v.grad.numpy()
    assert (g[:, kind == 1] == 0).all()
    assert (g[:, kind == 0] >= 1).all()         # COMPUTE: itself plus its COPY users


def test_joint_retrain_runs_and_ladders_follow_tolerances(lenet):
    model, net, splits = lenet
    x = splits["calib"].x[:64]
    plan = _plan(net, x)
    tr = splits["train"]
    m2 = finetune.joint_retrain(model, net.layers, [plan, {}], tr.x[:128], tr.y[:128],
                                epochs=1, progress=False)
    moved = sum(float((a - b).detach().abs().sum()) for a, b in
                zip(model.parameters(), m2.parameters()))
    assert moved > 0
    ev = NetEval(net, x, splits["calib"].y[:64])
    lad = joint.build_ladders(ev, first_layer_velcro=True, tolerances=joint.WIDE_TOLERANCES)
    same = run._ladders_after_retraining(lad, net, net)
    for a, b in zip(lad.et, same.et):
        assert len(a) == len(b)
        for ra, rb in zip(a, b):
            assert (ra is None and rb is None) or (
                np.array_equal(ra.order, rb.order) and np.array_equal(ra.spec, rb.spec)
                and np.array_equal(ra.th, rb.th))
    for (B, V), (B2, V2) in zip(lad.bv, same.bv):
        assert np.allclose(B, B2) and V is V2


def test_optimize_retrain_options_for_joint(tmp_path, capsys):
    from skipconv.sw.cli import main

    assert main(["optimize", "lenet", "--method", "velcro", "--retrain", "2", "-o",
                 str(tmp_path)]) == 2
    assert "zero_pred or joint" in capsys.readouterr().err
    assert main(["optimize", "lenet", "--method", "joint", "--retrain", "2", "--retrain-set",
                 "walk", "-o", str(tmp_path)]) == 2
    assert "--retrain-set: only with --method zero_pred" in capsys.readouterr().err
    assert main(["optimize", "lenet", "--method", "zero_pred", "--retrain", "2",
                 "--retrain-distill", "0.5", "-o", str(tmp_path)]) == 2
    assert "--retrain-distill: only with --method joint" in capsys.readouterr().err
    assert main(["optimize", "lenet", "--method", "velcro", "--retrain-continue", "yes", "-o",
                 str(tmp_path)]) == 2
    assert "--retrain-continue: only with --method joint" in capsys.readouterr().err
    assert main(["optimize", "lenet", "--method", "joint", "--retrain", "2",
                 "--retrain-distill", "1.5", "-o", str(tmp_path)]) == 2
    assert "--retrain-distill 1.5: must be in [0, 1)" in capsys.readouterr().err
    assert main(["optimize", "lenet", "--method", "joint", "--retrain-continue", "no", "-o",
                 str(tmp_path)]) == 2
    assert "--retrain-continue: needs --retrain EPOCHS" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())                 # nothing written


def test_joint_retrained_walks_the_steps_past_the_chosen_one(lenet):
    """The pipeline on a hand-made three-step trajectory (floor chosen): one epoch of
    retraining (half of the loss distilled from the original network), the chosen step and
    the two later ones walked again with both guards, drops against the original network,
    and the search continued on the retrained network from the last step within."""
    model, net, splits = lenet
    c, t = splits["calib"], splits["train"]
    ev = NetEval(net, c.x[:100], c.y[:100])
    ev_s = NetEval(net, t.x[:100], t.y[:100])
    lad = joint.build_ladders(ev_s, model=model, first_layer_velcro=True,
                              tolerances=joint.WIDE_TOLERANCES,
                              perf_rates=joint.FINE_PERF_RATES)
    floor = {i: {m: 0 for m in joint.METHODS} for i in range(3)}
    s1 = {i: dict(v) for i, v in floor.items()}
    s1[1]["velcro"] = 2
    s2 = {i: dict(v) for i, v in s1.items()}
    s2[2]["perf"], s2[1]["et"] = 2, 2
    res = joint.JointResult(plan=joint._plan(ev_s, lad, floor), states=floor,
                            chosen=0, trail=[floor, s1, s2])
    starts = []

    def search(start, ev_r, lad, val):
        starts.append((start, ev_r, val))
        return joint.optimize(ev_r, 0.01, ladders=lad, margin=3.0, nll_cap=None, val=val,
                              start=start, max_rounds=2, progress=False)

    net_c, ev_c, plan, info = run._joint_retrained(
        model, net, splits, ev, ev_s, lad, res, 0.01, 3.0, 0.5, 1,
        {"retrain_lr": 1e-4, "retrain_distill": 0.5, "retrain_continue": "yes"}, 1,
        False, search)
    assert info["trained_steps"] == [1, 2] and [k["step"] for k in info["checks"]] == [0, 1, 2]
    assert info["distill"] == 0.5 and info["continue"] is True
    within = [k["step"] for k in info["checks"] if k["within"]]
    if within:
        # continued from the last step within, on the retrained network's evaluations
        (start, ev_r, val), = starts
        assert start == res.trail[within[-1]]
        assert ev_r.net is not net and val.base is ev.base
        assert "continued" in info
    else:
        assert not starts
    assert ev_c.base is ev.base or ev_c is ev          # drops against the original network
    if info["adopted"]:
        assert net_c is not net and info["chosen"] in (1, 2, "continued")
        assert info["calib_mac_reduction"] > info["calib_mac_reduction_without"]
    else:
        assert net_c is net and plan is res.plan and info["reason"]


def test_joint_retrain_options_are_checked(lenet):
    model, net, splits = lenet
    c = splits["calib"]
    ev = NetEval(net, c.x[:20], c.y[:20])
    floor = {i: {m: 0 for m in joint.METHODS} for i in range(3)}
    res = joint.JointResult(plan={}, states=floor, chosen=0, trail=[floor])
    for opts, msg in (({"retrain_distill": 1.0}, "retrain_distill = 1.0"),
                      ({"retrain_distill": "x"}, "retrain_distill = 'x'"),
                      ({"retrain_continue": "maybe"}, "retrain_continue = 'maybe'")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            run._joint_retrained(model, net, splits, ev, ev, None, res, 0.01, 3.0, 0.5, 1,
                                 opts, 1, False, None)


def test_bench_retrain_options_are_checked_before_any_run():
    from skipconv.sw.cli import main

    for argv, msg in ((["--retrain-lr", "0"], "--retrain-lr 0.0: must be > 0"),
                      (["--retrain-distill", "1"], "--retrain-distill 1.0: must be in [0, 1)")):
        with pytest.raises(SystemExit, match=re.escape(msg)):
            main(["bench", "methods", "--methods", "joint_retrain", *argv])


def test_report_labels_say_whether_retraining_was_adopted():
    from skipconv.sw.report import _label

    s = {"method": "joint", "info": {}}
    assert _label(s) == "joint"
    s["info"]["retrain"] = {"adopted": True}
    assert _label(s) == "joint+retrained"
    s["info"]["retrain"] = {"adopted": False}
    assert _label(s) == "joint+retrain(not adopted)"


def test_carried_over_rungs_keep_taps_and_real_thresholds(lenet):
    """A predictive rung on a retrained (here: rescaled, one weight's sign flipped) layer
    keeps its speculative taps and its thresholds as real partial sums; the rest of the
    order follows the new weights (positive first) and the layer still validates."""
    import dataclasses

    _, net, _ = lenet
    L = net.layers[1]
    n = np.full(L.cout, 4)
    th = np.arange(L.cout, dtype=np.int64) * 3 - 5
    rung = snapea.predictive(L, n, th)
    w2 = np.asarray(L.w).copy()
    flat = w2.reshape(L.cout, -1)
    tail = int(rung.order[0][-1])                  # a non-speculative tap of kernel 0
    flat[0, tail] = abs(int(flat[0, tail])) + 1     # now positive
    meta = dict(L.meta, s_x=float(L.meta["s_x"]) * 2.0)
    L2 = dataclasses.replace(L, w=w2, meta=meta)
    got = snapea.carried_over(rung, L2)
    got.validate()
    for c in range(L.cout):
        assert list(got.order[c][:4]) == list(rung.order[c][:4])
        rest = got.order[c][4:int(got.neg_start[c])]
        assert (flat[c, rest] > 0).all()
        assert (flat[c, got.order[c][int(got.neg_start[c]):]] <= 0).all()
    assert np.array_equal(got.th, np.round(th / 2.0).astype(np.int64))
    assert snapea.carried_over(snapea.exact(L), L2).et == "exact"
    assert int(tail) in list(got.order[0][4:int(got.neg_start[0])])
