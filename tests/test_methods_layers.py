"""Method building blocks on single random layers: validity, exactness, the C formula."""

import numpy as np
import pytest

from skipconv.sw import golden
from skipconv.sw.layer import COPY, CONST, LayerError, load, save
from skipconv.sw.methods import perforation, snapea, velcro, zero_pred
from skipconv.sw.methods.emulate import emulate
from skipconv.sw.methods.executor import LocalExecutor, SerialExecutor
from skipconv.sw.randlayer import diagonal_leaders, random_input, random_layer


def _layer(seed=0, **kw):
    return random_layer(np.random.default_rng(seed), cin=4, cout=6, h=10, w=9, **kw)


def test_exact_snapea_changes_no_output_and_stops_early():
    L = _layer()
    E = snapea.exact(L)
    E.validate(g=1)
    rng = np.random.default_rng(1)
    stopped = 0
    for _ in range(3):
        x = random_input(rng, L.in_shape)
        d, e = golden.run(L, x), golden.run(E, x)
        assert np.array_equal(d.out, e.out)
        stopped += e.early_term
    assert stopped > 0


def test_exact_snapea_refuses_a_signed_input():
    with pytest.raises(ValueError, match="act_signed"):
        snapea.exact(_layer(act_signed=True))


@pytest.mark.parametrize("g", [1, 2, 4])
def test_predictive_layers_validate_with_spec_a_multiple_of_g(g):
    L = _layer(seed=g)
    n = np.full(L.cout, 2 * g)
    P = snapea.predictive(L, n, np.zeros(L.cout, np.int64))
    P.validate(g=g)
    wf = L.w.reshape(L.cout, -1)
    for c in range(L.cout):      # the speculative taps go first: one per group, largest |w|
        head = P.order[c, :2 * g]
        assert set(head) == set(snapea.speculative_taps(wf[c], 2 * g))


def test_speculation_may_zero_outputs_and_saves_macs():
    L = _layer(seed=3)
    rng = np.random.default_rng(3)
    x = np.stack([random_input(rng, L.in_shape) for _ in range(4)])
    P = snapea.predictive(L, np.full(L.cout, 4), np.full(L.cout, 10**9))
    r = emulate(P, x)
    assert (r.out == 0).all()                       # a huge threshold stops everything at N
    assert r.counters["performed"] == 4 * x.shape[0] * L.cout * np.prod(L.out_hw)


def test_diagonal_leaders_and_patterns():
    L = _layer()
    D = zero_pred.diagonal(L, 3)
    assert np.array_equal(D.leader, diagonal_leaders(*L.out_shape, 3))
    pats = zero_pred.patterns(2, (1, 2))
    assert len(pats) == 4 + 6 and np.array_equal(pats[0], np.eye(2, dtype=bool))
    with pytest.raises(ValueError, match="ones_range"):
        zero_pred.patterns(2, (4, 4))


@pytest.mark.parametrize("kind", ["uniform", "grid", "pooling", "impact"])
def test_perforation_masks_rates_and_nn_targets(kind):
    ho, wo, r = 10, 9, 0.5
    if kind == "uniform":
        m = perforation.uniform_mask(ho, wo, r)
    elif kind == "grid":
        m = perforation.grid_mask(ho, wo, r)
    elif kind == "pooling":
        m = perforation.pooling_mask(ho, wo, r, 3, 2)
    else:
        m = perforation.impact_mask(np.random.default_rng(0).random((ho, wo)), r)
    assert 0.3 <= m.mean() <= 0.6
    nn = perforation.nn_table(m)
    assert not m[nn[..., 0], nn[..., 1]].any()       # every target is computed
    L = perforation.apply(_layer(), m)
    L.validate(g=1)
    assert np.array_equal(perforation.perforated_of(L), m)


def test_zero_prediction_and_perforation_never_share_a_layer():
    L = _layer()
    P = perforation.apply(L, perforation.grid_mask(*L.out_hw, 0.5))
    with pytest.raises(ValueError, match="perforat"):
        zero_pred.diagonal(P, 2)
    with pytest.raises(ValueError, match="zero prediction"):
        perforation.apply(zero_pred.diagonal(L, 2), perforation.grid_mask(*L.out_hw, 0.5))


def test_velcro_apply_counts_and_constants(tmp_path):
    L = _layer()
    rng = np.random.default_rng(5)
    outs = emulate(L, np.stack([random_input(rng, L.in_shape) for _ in range(8)])).out
    (B, V), = velcro.moments([[outs]])
    V2 = velcro.apply(L, B, V, 0.3)
    n = int(np.prod(L.out_shape))
    assert int((V2.kind == CONST).sum()) == int(np.floor(0.3 * n + 0.5))
    sel = V2.kind == CONST
    assert np.array_equal(V2.const[sel], np.clip(np.floor(B[sel] + 0.5), 0, 255))
    assert V[sel].max() <= V[~sel].min()             # the lowest-variance share
    save(tmp_path / "v.npz", V2)
    load(tmp_path / "v.npz").validate(g=1)
    # VELCRO on a perforated layer: selected perforated positions become CONST.
    P = perforation.apply(L, perforation.grid_mask(*L.out_hw, 0.5))
    PV = velcro.apply(P, B, V, 0.3)
    PV.validate(g=1)
    assert ((PV.kind == CONST) | (PV.kind == COPY)).sum() >= (P.kind == COPY).sum()


def test_velcro_threshold_outside_range_is_refused():
    L = _layer()
    B = V = np.zeros(L.out_shape)
    with pytest.raises(ValueError, match="threshold"):
        velcro.apply(L, B, V, 1.0)


def _square(ctx, v):
    return ctx * v * v


def test_local_executor_equals_serial():
    items = list(range(7))
    with LocalExecutor(2) as ex:
        assert ex.map(_square, 3, items) == SerialExecutor().map(_square, 3, items)
    with pytest.raises(ValueError, match="processes"):
        LocalExecutor(-1)
