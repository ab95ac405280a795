"""``skipconv sim``: a case file through the simulated engine into a result file."""

import numpy as np
import pytest

from skipconv.sw import golden, randlayer
from skipconv.sw.cli import main
from skipconv.sw.golden import Result
from skipconv.sw.layer import save_case

pytestmark = pytest.mark.slow


def test_skipconv_sim_writes_the_engines_result(tmp_path):
    from test_sim_engine import CONFIGS
    config = CONFIGS["all-g1-lanes3"]          # the same build as the bench test (cached)
    rng = np.random.default_rng(21)
    layer = randlayer.random_layer(rng, cin=3, cout=4, h=7, w=6,
                                   features=("early_term", "zero_pred", "velcro"), p=2)
    x = randlayer.random_input(rng, layer.in_shape)
    case, res = tmp_path / "case.npz", tmp_path / "result.npz"
    save_case(case, layer, x)
    (tmp_path / "cfg.json").write_text(config.to_json())
    assert main(["sim", str(case), "--config", str(tmp_path / "cfg.json"), "-o", str(res),
                 "--compare"]) == 0
    got = Result.from_npz(res)
    want = golden.run(layer, x, config.g)
    assert want.mismatches(got) == []
    assert got.cycles is not None and got.cycles > 0


def test_skipconv_sim_refuses_a_layer_beyond_the_config(tmp_path, capsys):
    rng = np.random.default_rng(22)
    layer = randlayer.random_layer(rng, cin=40, cout=2, h=4, w=4, features=())
    x = randlayer.random_input(rng, layer.in_shape)
    save_case(tmp_path / "case.npz", layer, x)
    code = main(["sim", str(tmp_path / "case.npz"), "--preset", "icebreaker", "--trace",
                 "-o", str(tmp_path / "r.npz")])
    assert code == 2
    assert "LIMIT" in capsys.readouterr().err
    assert not (tmp_path / "r.npz").exists()
