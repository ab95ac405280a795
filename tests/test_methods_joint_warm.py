"""The joint search's warm start (``joint.seed_states``, ``choose_start``, ``optimize(start=)``):
a single method's configuration expressed in the joint ladders is step 0 of the trajectory, so
the back-off never returns less than it. Small budgets: a few hundred images, short ladders.
"""

import numpy as np
import pytest

from skipconv.sw import data
from skipconv.sw.methods import joint, perforation, run, snapea
from skipconv.sw.methods.common import NetEval
from skipconv.sw.methods.executor import SerialExecutor


def _ev(net, split, n):
    return NetEval(net, split.x[:n].numpy(), split.y[:n].numpy())


@pytest.fixture(scope="module")
def setting(lenet):
    model, net, splits = lenet
    ev = _ev(net, data.augment(splits["train"][np.arange(150)], 1), 150)   # search images
    val = _ev(net, splits["calib"], 200)                                   # back-off
    lad = joint.build_ladders(_ev(net, splits["train"], 150), model=model, zp_windows=(2,),
                              velcro_steps=(0.1, 0.2, 0.3, 0.4), perf_rates=(0.2, 0.4),
                              tolerances=(0.0, 0.04))
    return ev, val, lad


def test_seed_states_take_the_highest_rung_not_more_aggressive(setting):
    ev, _, lad = setting
    st = joint.seed_states(lad, velcro_T=(0.0, 0.25, 0.4), perforated=(0.3, 0.0, 0.45))
    assert [s["velcro"] for s in st.values()] == [0, 2, 4]        # T 0.2 <= 0.25, T 0.4
    for i, share in enumerate((0.3, 0.0, 0.45)):
        k = st[i]["perf"]
        assert lad.perf[i][k].mean() <= share + 1e-9
        assert k + 1 == len(lad.perf[i]) or lad.perf[i][k + 1].mean() > share
    assert all(s["zp"] == 0 and s["et"] == 0 for s in st.values())
    # Perforation shares measured on a plan map back to the rung they came from.
    L = perforation.apply(ev.layers[1], lad.perf[1][2])
    share = float(perforation.perforated_of(L).mean())
    assert joint.seed_states(lad, perforated=(0.0, share))[1]["perf"] == 2


def test_snapea_seed_takes_the_highest_rung_of_at_most_its_tolerance(setting):
    _, _, lad = setting
    tols = (0.0, 0.03, 1.0)
    st = joint.seed_states(lad, et_tol=tols)
    for i, t in enumerate(tols):
        k, rt = st[i]["et"], lad.et_tol[i]
        assert k == 0 or rt[k] <= t                               # never more aggressive
        assert all(v is None or v > t for v in rt[k + 1:])        # the highest such rung
        assert all(st[i][m] == 0 for m in ("zp", "velcro", "perf"))
    assert st[2]["et"] == len(lad.et[2]) - 1                      # 1.0: the top rung
    # No plan / no rung: rung 0 (off on the signed first layer, exact on the others).
    for none in (None, (), (None, None, None)):
        assert all(s["et"] == 0 for s in joint.seed_states(lad, et_tol=none).values())
    no_tol = joint.Ladders(et=lad.et, zp=lad.zp, velcro=lad.velcro, perf=lad.perf, bv=lad.bv)
    with pytest.raises(ValueError, match="et_tol"):
        joint.seed_states(no_tol, et_tol=(0.04,))


def test_snapea_levels_name_the_plans_rungs_and_seed_the_start(setting, lenet):
    ev, val, lad = setting
    levels = {}
    plan = snapea.optimize(val, 0.005, tolerances=(0.0, 0.04), levels=levels, progress=False)
    assert sorted(levels) == list(range(len(val.layers)))
    for i, t in levels.items():
        et = plan[i].et if i in plan else None
        if t is None or (t == 0.0 and not val.layers[i].act_signed):
            assert et in (None, "exact")
        else:
            assert t in (0.0, 0.04) and et == "predictive"
    # The warm start runs the same SnaPEA search and offers it, alone and with VELCRO, to
    # choose_start (the order of run.WARM_METHODS).
    model = lenet[0]
    _, info = run._warm_start(("velcro", "snapea"), model, val, ev, ev, lad, 0.01, 3.0, 0.5,
                              SerialExecutor(), False)
    assert [c["label"] for c in info["checks"]] == ["snapea", "velcro", "snapea+velcro"]
    assert len(info["snapea_tol"]) == len(val.layers)


def test_warm_started_search_never_ends_below_its_seed_and_stays_within(setting):
    ev, val, lad = setting
    eps, margin, val_margin = 0.01, 3.0, 0.5
    seeds = {"velcro": joint.seed_states(lad, velcro_T=(0.2, 0.2, 0.1)),
             "too_far": joint.seed_states(lad, velcro_T=(0.4, 0.4, 0.4),
                                          perforated=(0.45, 0.45, 0.45))}
    label, start, checks = joint.choose_start(ev, val, lad, seeds, eps, margin=margin,
                                              val_margin=val_margin)
    assert [c["label"] for c in checks] == ["velcro", "too_far"]
    assert label == "velcro" and not checks[1]["within"]
    seed_saved = ev.run(joint._plan(ev, lad, start)).saved
    res = joint.optimize(ev, eps, ladders=lad, margin=margin, nll_cap=None, max_jump=1,
                         max_rounds=4, val=val, val_margin=val_margin, val_stop=1.5,
                         start=start, progress=False)
    assert res.history[0][0] == "start" and res.trail[0] == start
    assert res.history[0][3] == seed_saved
    assert res.history[res.chosen][3] >= seed_saved          # never below the seed
    assert ev.run(res.plan).saved == res.history[res.chosen][3]
    assert res.val[res.chosen]["drop"] <= eps * val_margin + 1e-12   # within the back-off
    for _, acc, _, _ in res.history:
        assert ev.base.acc - acc <= eps * margin + 1e-12              # and the search guard
    for i, st in res.states.items():                          # moves only raise rungs
        assert all(st[m] >= start[i][m] for m in joint.METHODS)
        assert not (st["zp"] and st["perf"])


def test_step_down_and_merge_work_rung_by_rung():
    st = {0: {"et": 2, "velcro": 0}, 1: {"et": 0, "velcro": 5}}
    assert joint.step_down(st, 2) == {0: {"et": 0, "velcro": 0}, 1: {"et": 0, "velcro": 3}}
    assert joint.step_down(st, 0) == st
    assert joint.step_down(joint.step_down(st, 5)) is None        # nothing left to lower
    assert joint.merge_states(st, {1: {"perf": 1}, 2: {"et": 1}}) == {
        0: {"et": 2, "velcro": 0}, 1: {"et": 0, "velcro": 5, "perf": 1}, 2: {"et": 1}}


def test_a_seed_past_the_guards_is_stepped_down_until_within(setting):
    ev, val, lad = setting
    eps, margin, val_margin = 0.01, 3.0, 0.5
    far = joint.seed_states(lad, velcro_T=(0.4, 0.4, 0.4), perforated=(0.45, 0.45, 0.45))
    _, _, [dropped] = joint.choose_start(ev, val, lad, {"far": far}, eps, margin=margin,
                                         val_margin=val_margin)
    assert not dropped["within"] and dropped["rungs_down"] == 0
    label, start, [rec] = joint.choose_start(ev, val, lad, {"far": far}, eps, margin=margin,
                                             val_margin=val_margin, step_downs=8)
    k = rec["rungs_down"]
    assert rec["within"] and k >= 1 and label == rec["label"] == f"far[-{k}]"
    assert rec["seed"] == "far"
    assert start == joint.step_down(joint._checked_states(lad, far, len(ev.layers)), k)
    assert any(v for st in start.values() for v in st.values())    # something is left
    # The first milder version within: one rung less mild is not.
    _, _, [prev] = joint.choose_start(ev, val, lad, {"p": joint.step_down(far, k - 1)}, eps,
                                      margin=margin, val_margin=val_margin)
    assert not prev["within"]
    # The stepped-down start is one optimize accepts (within both guards).
    res = joint.optimize(ev, eps, ladders=lad, margin=margin, nll_cap=None, max_rounds=0,
                         val=val, val_margin=val_margin, start=start, progress=False)
    assert res.history[0][0] == "start"


def test_a_start_outside_the_guards_is_refused(setting):
    ev, val, lad = setting
    far = joint.seed_states(lad, velcro_T=(0.4, 0.4, 0.4), perforated=(0.45, 0.45, 0.45))
    with pytest.raises(ValueError, match="start: guarded top-1 drop"):
        joint.optimize(ev, 0.01, ladders=lad, margin=3.0, nll_cap=None, max_rounds=1,
                       val=val, val_margin=0.5, start=far, progress=False)
    bad = {0: {"zp": 1, "perf": 1}}
    with pytest.raises(ValueError, match="zero prediction and perforation together"):
        joint.optimize(ev, 0.01, ladders=lad, max_rounds=1, start=bad, progress=False)


def test_warm_option_is_checked_by_name():
    assert run._warm(None) == () and run._warm("none") == () and run._warm("") == ()
    assert run._warm("velcro, perforation") == ("velcro", "perforation")
    assert run._warm(("perforation",)) == ("perforation",)
    assert run._warm("snapea,velcro") == ("snapea", "velcro")
    with pytest.raises(ValueError, match="warm = 'zero_pred'"):
        run._warm("zero_pred")


def test_warm_options_are_on_the_command_lines(capsys):
    from skipconv.sw.cli import main
    for cmd in (["optimize", "--help"], ["bench", "methods", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(cmd)
        assert e.value.code == 0
        assert "--joint-warm" in capsys.readouterr().out
    assert main(["optimize", "lenet", "--method", "velcro", "--joint-warm", "velcro",
                 "-o", "unused"]) == 2
    assert "--joint-warm: only with --method joint" in capsys.readouterr().err


def test_step_downs_option_is_checked():
    assert run._count(4, "step_downs") == 4 and run._count("0", "step_downs") == 0
    for bad in (-1, "many", "2.5"):
        with pytest.raises(ValueError, match="step_downs = .*whole number >= 0"):
            run._count(bad, "step_downs")
    from skipconv.sw.cli import main
    with pytest.raises(SystemExit, match="--joint-step-downs -1: must be >= 0"):
        main(["bench", "methods", "--joint-step-downs", "-1", "--methods", "joint"])
