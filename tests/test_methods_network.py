"""The methods on the example network (lenet, real MNIST), checked by golden execution.

Small budgets: a few dozen to a few hundred images and short option ladders.
"""

import numpy as np
import pytest

from skipconv.sw import data, export, golden
from skipconv.sw.layer import load, save
from skipconv.sw.methods import joint, perforation, snapea, velcro, zero_pred
from skipconv.sw.methods.common import NetEval, golden_eval
from skipconv.sw.methods.emulate import emulate


def _ev(net, split, n):
    return NetEval(net, split.x[:n].numpy(), split.y[:n].numpy())


def _plans(model, net, splits):
    ev = _ev(net, splits["calib"], 80)
    yield "snapea", snapea.optimize(ev, 0.02, tolerances=(0.0, 0.02, 0.08), progress=False)
    yield "zero_pred", zero_pred.optimize(ev, 0.02, mode="uniform_filter", p=2,
                                          ones_range=(1, 2), gt=3, max_patterns=3, top_m=2,
                                          progress=False)
    pre, val = ev.subset(np.arange(30)), ev.subset(np.arange(30, 80))
    yield "velcro", velcro.optimize(pre, val, 0.0, step=0.2, max_rounds=3, progress=False)[0]
    yield "perforation", perforation.optimize(ev, 0.02, mask="impact", model=model,
                                              rates=(0.25, 0.5), impact_images=40,
                                              progress=False)


def test_each_methods_packages_load_validate_and_run_on_golden(lenet, tmp_path):
    model, net, splits = lenet
    x_ins = net.layer_inputs(splits["test"].x[:3])
    seen = set()
    for name, plan in _plans(model, net, splits):
        assert plan, f"{name}: the search configured no layer"
        for i, L in plan.items():
            path = tmp_path / name / f"{i:02d}.npz"
            save(path, L)
            back = load(path)
            back.validate(g=1)
            seen |= back.features
            r = golden.run(back, x_ins[i])
            assert np.array_equal(r.out, emulate(L, x_ins[i]).out)
            assert r.dense == r.performed + r.velcro + r.perforation + r.zero_pred + r.early_term
    assert seen == {"early_term", "zero_pred", "velcro", "perforation"}


def test_exact_snapea_changes_no_output_of_the_network(lenet):
    _, net, splits = lenet
    x, y = splits["test"].x[:40].numpy(), splits["test"].y[:40].numpy()
    plan = {i: snapea.exact(L) for i, L in enumerate(net.layers) if not L.act_signed}
    assert len(plan) == len(net.layers) - 1             # all but the signed first layer
    dense = golden_eval(net, {}, x, y, progress=False)
    exact = golden_eval(net, plan, x, y, progress=False)
    assert np.array_equal(dense.pred, exact.pred) and dense.nll == exact.nll
    for i in plan:
        assert exact.layers[i]["early_term"] > 0
    inputs = net.layer_inputs(x[:5])
    for i, L in plan.items():
        assert np.array_equal(golden.run(L, inputs[i]).out, golden.run(net.layers[i], inputs[i]).out)


def test_velcro_C_formula_equals_golden_skipped_macs(lenet):
    _, net, splits = lenet
    ev = _ev(net, splits["calib"], 60)
    bv = velcro.variance_tensors(ev)
    T = (0.0, 0.33, 0.17)
    plan = {k: velcro.apply(net.layers[k], *bv[k], t) for k, t in enumerate(T) if t}
    r = golden_eval(net, plan, splits["test"].x[:10].numpy(), splits["test"].y[:10].numpy(),
                    progress=False)
    tot = r.total
    C = velcro.compression_saving_ratio(T, net.layers)
    assert tot["velcro"] > 0
    assert C == pytest.approx(tot["velcro"] / tot["dense"], abs=1e-12)
    # The realized thresholds are the asked ones up to one element per layer.
    for t, tr, L in zip(T, velcro.realized_thresholds(T, net.layers), net.layers):
        assert abs(t - tr) <= 1 / np.prod(L.out_shape)


def test_diagonal_zero_prediction_reproduces_the_papers_trend(lenet):
    """Larger windows: more activations predicted per window, fewer windows predicted,
    and a larger share of false predictions (Shomron & Weiser 2018, Sec. 2.3 / Fig. 5)."""
    _, net, splits = lenet
    ev = _ev(net, splits["calib"], 120)
    st = {p: zero_pred.prediction_stats(ev, {i: zero_pred.diagonal(L, p)
                                             for i, L in enumerate(net.layers)})
          for p in (2, 3, 4, 5)}
    per_window = [st[p].predicted_per_window for p in (2, 3, 4, 5)]
    window_rate = [st[p].window_rate for p in (2, 3, 4, 5)]
    assert all(a < b for a, b in zip(per_window, per_window[1:]))
    assert all(a > b for a, b in zip(window_rate, window_rate[1:]))
    assert st[3].false_rate > st[2].false_rate
    assert max(st[4].false_rate, st[5].false_rate) > st[3].false_rate
    assert all(st[p].mac_reduction > 0 for p in st)


def _small_ladders(ev, model):
    """A few rungs per method: joint searches that run in seconds."""
    return joint.build_ladders(ev, model=model, zp_windows=(2, 3), velcro_steps=(0.1, 0.2, 0.3),
                               perf_rates=(0.2, 0.4), tolerances=(0.0, 0.01, 0.04))


def test_joint_configuration_respects_eps_on_the_test_split(lenet):
    model, net, splits = lenet
    eps = 0.01
    ev = _ev(net, splits["calib"], 200)
    lad = _small_ladders(ev, model)
    res = joint.optimize(ev, eps, ladders=lad, max_jump=1, max_rounds=5, progress=False)
    used = set().union(*(L.features for L in res.plan.values()))
    assert len(used) >= 2, used
    verdict = joint.check(net, res.plan, splits["test"].x[:400].numpy(),
                          splits["test"].y[:400].numpy(), eps, progress=False)
    assert verdict["mac_reduction"] > 0.2
    assert verdict["within_eps"], verdict["drop"]


def test_joint_search_on_train_images_backs_off_on_held_out_ones(lenet):
    model, net, splits = lenet
    eps = 0.01
    ev = _ev(net, splits["train"], 150)           # search: training images, margin loss
    val = _ev(net, splits["calib"], 200)          # back-off: held-out images (not test)
    lad = joint.build_ladders(ev, model=model, zp_windows=(2,), velcro_steps=(0.2, 0.4),
                              perf_rates=(0.3, 0.6), tolerances=(0.0, 0.04, 0.15))
    res = joint.optimize(ev, eps, ladders=lad, max_jump=1, max_rounds=6, objective="margin",
                         nll_cap=None, val=val, val_margin=0.5, val_stop=1.0, progress=False)
    assert len(res.val) == len(res.history) >= 2
    drops = [v["drop"] for v in res.val]
    assert drops[res.chosen] <= eps * 0.5 + 1e-12
    assert all(d > eps * 0.5 for d in drops[res.chosen + 1:])     # the last one within
    assert all(d <= eps for d in drops[:-1])                      # stopped at the first > eps
    r = val.run(res.plan)                                         # the plan is that step's
    assert val.base.acc - val.guarded_acc(r) == pytest.approx(drops[res.chosen])
    assert ev.run(res.plan).saved == res.history[res.chosen][3]


def test_margin_loss_counts_losses_only():
    from skipconv.sw.methods.common import margins
    z = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    assert margins(z, np.array([0, 0])).tolist() == [2.0, -2.0]


def test_augment_is_seeded_on_the_grey_levels_and_keeps_labels():
    split = data.mnist_split("train")[np.arange(40)]
    a, b, c = data.augment(split, 1), data.augment(split, 1), data.augment(split, 2)
    assert a.x.shape == split.x.shape and a.x.dtype == split.x.dtype
    assert (a.y == split.y).all()
    assert (a.x == b.x).all() and not (a.x == c.x).all()
    levels = (a.x.numpy() + 1) * 127.5
    assert np.abs(levels - np.round(levels)).max() < 1e-3
    assert levels.min() >= -1e-3 and levels.max() <= 255 + 1e-3
    ident = data.augment(split, 1, shift=0.0, rotate=0.0, scale=0.0)
    assert np.abs(ident.x.numpy() - split.x.numpy()).max() < 1e-5


def test_augmented_training_images_are_unseen_by_the_network(lenet):
    # Why the joint search ranks its moves on augmented copies: the network has fitted its
    # training images (top-1 100 %, wide margins), not their augmented copies.
    from skipconv.sw.methods.common import margins
    _, net, splits = lenet
    train = splits["train"][np.arange(400)]
    plain = _ev(net, train, 400)
    aug = _ev(net, data.augment(train, 1), 400)
    assert plain.base.acc == 1.0
    assert aug.base.acc < 0.99
    assert (np.median(margins(aug.base.logits, aug.y))
            < 0.8 * np.median(margins(plain.base.logits, plain.y)))


def test_perforation_finetune_recovers_the_perforated_network(lenet):
    from skipconv.sw.methods import finetune
    model, net, splits = lenet
    train = splits["train"][np.arange(320)]
    G = perforation.impacts(model, net.layers, train.x[:100], train.y[:100])
    ladders = [[np.zeros(L.out_hw, bool), perforation.impact_mask(G[i], 0.7)]
               for i, L in enumerate(net.layers)]
    ft = finetune.perforation_finetune(model, net.layers, ladders, train.x, train.y,
                                       epochs=2, lr=2e-3, progress=False)
    assert ft is not model and not all(
        (a == b).all() for a, b in zip(ft.parameters(), model.parameters()))
    net_ft = export.export(ft, splits["calib"].x, spec={"zoo": "lenet"})
    nll = []
    for n in (net, net_ft):
        ev = _ev(n, train, 320)
        plan = {i: perforation.apply(L, ladders[i][1]) for i, L in enumerate(ev.layers)}
        nll.append(ev.run(plan).nll)
    assert nll[1] < 0.7 * nll[0], nll


def test_lazy_moves_keeps_new_and_best_known_moves_and_drops_broken_ones():
    moves = [((0, "et", 1), "a"), ((0, "et", 2), "b"), ((1, "zp", 1), "c"),
             ((1, "perf", 1), "d"), ((2, "velcro", 1), "e")]
    scores = {(0, "et", 1): 5.0, (0, "et", 2): None, (1, "zp", 1): 1.0, (1, "perf", 1): 9.0}
    picked = [mv for mv, _ in joint.lazy_moves(moves, scores, 1)]
    # (2, velcro, 1) was never evaluated; (1, perf, 1) has the best last score; (0, et, 2)
    # broke the budget and stays out.
    assert picked == [(2, "velcro", 1), (1, "perf", 1)]
    assert [mv for mv, _ in joint.lazy_moves(moves, scores, 3)] == [
        (2, "velcro", 1), (1, "perf", 1), (0, "et", 1), (1, "zp", 1)]


def test_lazy_joint_search_evaluates_fewer_candidates_within_the_same_guards(lenet):
    model, net, splits = lenet
    eps = 0.01
    ev = _ev(net, splits["calib"], 150)
    lad = _small_ladders(ev, model)
    kw = dict(ladders=lad, max_jump=1, max_rounds=8, progress=False)
    full = joint.optimize(ev, eps, **kw)
    lazy = joint.optimize(ev, eps, lazy_k=1, full_every=0, **kw)
    assert lazy.evaluations < full.evaluations
    assert lazy.stop in ("no_move", "max_rounds")
    # The first round is full in both, so both take the same first move.
    assert lazy.history[1][0] == full.history[1][0]
    for _, acc, nll, saved in lazy.history[1:]:
        assert ev.base.acc - acc <= eps * 0.25 + 1e-12       # optimize's default margin
        assert nll - ev.base.nll <= 0.03 + 1e-12              # and NLL cap
    r = ev.run(lazy.plan)
    assert r.saved == lazy.history[lazy.chosen][3] > 0


def test_joint_search_starts_no_round_past_max_seconds(lenet):
    model, net, splits = lenet
    ev = _ev(net, splits["calib"], 60)
    lad = joint.build_ladders(ev, model=model, zp_windows=(2,), velcro_steps=(0.1,),
                              perf_rates=(0.2,), tolerances=(0.0, 0.04))
    res = joint.optimize(ev, 0.01, ladders=lad, max_jump=1, max_seconds=0.0, progress=False)
    assert res.stop == "max_seconds" and res.evaluations == 0
    assert [h[0] for h in res.history] == ["floor"] and res.chosen == 0


def test_joint_search_options_are_checked_by_name():
    from skipconv.sw.methods import run

    assert run._lazy_k("full") is None and run._lazy_k("3") == 3
    with pytest.raises(ValueError, match="lazy_k = 'many'"):
        run._lazy_k("many")
    with pytest.raises(ValueError, match="lazy_k = -2"):
        run._lazy_k(-2)
    assert run._seconds("90") == 90.0
    with pytest.raises(ValueError, match="max_seconds = 'soon'"):
        run._seconds("soon")


def _search_and_val(net, splits):
    # Search images: augmented copies of training images (as run.optimize_model); held-out:
    # calibration images (never test).
    ev = _ev(net, data.augment(splits["train"][np.arange(150)], 1), 150)
    return ev, _ev(net, splits["calib"], 200)


def _val_drop(val, plan):
    return val.base.acc - val.guarded_acc(val.run(plan))


def _binding_margin(val, free, eps):
    """A held-out budget (as a share of ``eps``) that the search without the held-out check
    overspends, whatever the trained network: half of what that search loses there. The zoo's
    weights differ between CPUs (float kernels), so a fixed budget binds on one machine's
    network and not on another's."""
    lost = _val_drop(val, free)
    assert lost > 1e-12, "the search without the held-out check lost no held-out image"
    return min(1.0, lost / eps / 2)


def test_perforation_search_backs_off_on_held_out_images(lenet):
    from skipconv.sw.methods.common import HeldOut
    model, net, splits = lenet
    eps = 0.01
    ev, val = _search_and_val(net, splits)
    kw = dict(mask="impact", model=model, rates=(0.2, 0.4, 0.6), impact_images=60,
              progress=False)
    free = perforation.optimize(ev, eps * 3, **kw)          # no held-out check
    margin = _binding_margin(val, free, eps)
    held = HeldOut(val, eps, margin=margin, stop=1.0)
    plan = perforation.optimize(ev, eps * 3, holdout=held, **kw)
    drops, c = held.drops, held.chosen()
    assert held.history[0]["step"] == "base" and len(drops) >= 3
    assert drops[c] <= eps * margin + 1e-12
    assert all(d > eps * margin + 1e-12 for d in drops[c + 1:])   # the last one within
    assert all(d <= eps + 1e-12 for d in drops[:-1])          # stopped at the first > eps
    assert _val_drop(val, plan) == pytest.approx(drops[c])    # the plan is that step's
    assert held.history[c]["mac_reduction"] == pytest.approx(val.run(plan).mac_reduction)
    # The back-off binds: the chosen plan is an earlier step of the same trajectory.
    assert 0 <= ev.run(plan).saved < ev.run(free).saved


def test_zero_prediction_layer_pass_requires_the_held_out_budget(lenet):
    from skipconv.sw.methods.common import HeldOut
    _, net, splits = lenet
    eps = 0.01
    ev, val = _search_and_val(net, splits)
    kw = dict(mode="uniform_layer", p=4, ones_range=(1, 3), max_patterns=6, top_m=2,
              progress=False)
    free = zero_pred.optimize(ev, 0.05, **kw)
    for margin in (_binding_margin(val, free, eps), 0.0):
        held = HeldOut(val, eps, margin=margin)
        plan = zero_pred.optimize(ev, 0.05, holdout=held, **kw)
        drops, c = held.drops, held.chosen()
        assert drops, "the layer pass checked nothing on the held-out images"
        assert all(d > eps * margin + 1e-12 for d in drops[:-1])  # walked down past these
        if c is None:
            assert plan == {}                                     # nothing within: base plan
        else:
            assert c == len(drops) - 1 and drops[c] <= eps * margin + 1e-12
            assert _val_drop(val, plan) == pytest.approx(drops[c])
            assert 0 < ev.run(plan).saved < ev.run(free).saved


def test_held_out_choice_and_bad_settings():
    from skipconv.sw.methods.common import HeldOut
    h = HeldOut(None, 0.01, margin=0.5, stop=1.5)
    assert h.chosen() is None
    h.history = [{"drop": d} for d in (0.0, 0.004, 0.006, 0.005, 0.012, 0.02)]
    assert h.chosen() == 3
    assert not h.exceeded(0.015) and h.exceeded(0.0151)
    with pytest.raises(ValueError, match="held-out margin = -0.5"):
        HeldOut(None, 0.01, margin=-0.5)
    with pytest.raises(ValueError, match="held-out eps = 'x'"):
        HeldOut(None, "x")


def test_single_method_search_set_is_checked_by_name(lenet, tmp_path):
    from skipconv.sw.methods import run
    for method in ("zero_pred", "perforation"):
        with pytest.raises(ValueError, match=f"{method} search = 'test'"):
            run.optimize_model("lenet", method, 0.01, tmp_path, loaded=lenet, progress=False,
                               options={"search": "test"})
