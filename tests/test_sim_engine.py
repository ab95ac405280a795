"""cocotb benches of the generated engine (Verilator), against the golden model bit for bit.

One Verilator build and one simulation per config (cocotb starts once), each running many
steps: random layers covering every mechanism alone and together, random valid/ready stalls on
both streams, every malformed command of the catalogue each followed by a correct layer, and a
reset in the middle of a layer followed by a correct layer. Each reply is compared word for
word with the protocol responder inside the bench; here every layer's decoded result is also
compared with ``golden.run`` directly.
"""

import numpy as np
import pytest

from skipconv.sim import runner
from skipconv.sim.bench import jobs
from skipconv.sim.bench.malformed import malformed_cases, small_layer
from skipconv.sw import golden, randlayer
from skipconv.sw import protocol as P
from skipconv.sw.config import FEATURES, EngineConfig

pytestmark = pytest.mark.slow

_SMALL = dict(max_taps=256, max_ifmap=1024, max_cout=16, max_ofmap=1024, max_k=5, max_p=4)
CONFIGS = {
    "all-g1-lanes3": EngineConfig(lanes=3, g=1, bus_bits=32, features=frozenset(FEATURES),
                                  **_SMALL),
    "all-g2-lanes2-bus64": EngineConfig(lanes=2, g=2, bus_bits=64,
                                        features=frozenset(FEATURES), **_SMALL),
    "dense-notrace-lanes4": EngineConfig(lanes=4, g=1, features=frozenset(), trace=False,
                                         **_SMALL),
}

#: Feature sets of the random layers (zero prediction and perforation never share a layer).
LAYER_FEATURES = [(), ("early_term",), ("zero_pred",), ("velcro",), ("perforation",),
                  ("early_term", "zero_pred", "velcro"),
                  ("early_term", "perforation", "velcro")]


def _layers(config, rng):
    """``[(tag, layer, x)]``: random layers this engine can run, every mechanism it has."""
    out = []
    usable = [f for f in LAYER_FEATURES if set(f) <= config.features]
    shapes = [dict(cin=3, cout=5, h=7, w=9), dict(cin=2, cout=7, h=9, w=6, stride=2),
              dict(cin=4, cout=3, h=5, w=5, k=1, pad=0), dict(cin=1, cout=4, h=8, w=8, k=5,
                                                               pad=2)]
    for i, feats in enumerate(usable):
        for et in (("exact", "predictive") if "early_term" in feats else ("exact",)):
            shape = shapes[(i + len(out)) % len(shapes)]
            L = randlayer.random_layer(rng, features=feats, g=config.g, et=et,
                                       p=2 + (i % 3), **shape)
            out.append((f"{'+'.join(feats) or 'dense'}/{et}", L,
                        randlayer.random_input(rng, L.in_shape)))
    # Special modes: raw output, a signed first layer, a wide output.
    L = randlayer.random_layer(rng, cin=2, cout=3, h=6, w=6, raw=True, features=())
    out.append(("raw", L, randlayer.random_input(rng, L.in_shape)))
    feats = ("early_term",) if config.has("early_term") else ()
    L = randlayer.random_layer(rng, cin=3, cout=4, h=6, w=7, act_signed=True, features=feats,
                               et="predictive", g=config.g)
    out.append(("signed input", L, randlayer.random_input(rng, L.in_shape, signed=True)))
    return out


def _job(config, seed):
    rng = np.random.default_rng(seed)
    steps, checks = [], []

    def layer(tag, L, x, stall):
        steps.append(jobs.layer_step(L, x, config, tag=tag, stall_in=stall, stall_out=stall,
                                     seed=len(steps)))
        checks.append(("layer", L, x))

    for k, (tag, L, x) in enumerate(_layers(config, rng)):
        layer(tag, L, x, 0.3 if k % 2 else 0.0)
    # A reset in the middle of a layer, then a correct layer.
    big = small_layer(config, rng, cin=8, cout=8, h=10, w=10, name="interrupted")
    xb = randlayer.random_input(rng, big.in_shape)
    steps.append(jobs.reset_step(big, xb, config, after=40))
    checks.append(("reset", None, None))
    layer("after reset", big, xb, 0.2)
    # Every malformed command, each followed by a correct layer.
    for i, case in enumerate(malformed_cases(config, seed=seed)):
        steps.append(jobs.fault_step(case, stall_in=0.25 if i % 3 == 0 else 0.0,
                                     stall_out=0.25 if i % 3 == 1 else 0.0, seed=i))
        checks.append(("fault", case, None))
        L = small_layer(config, rng, name=f"after {case.name}")
        layer(f"after fault {i}", L, randlayer.random_input(rng, L.in_shape), 0.0)
    return jobs.job(steps), checks


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_engine_matches_golden(name):
    config = CONFIGS[name]
    job, checks = _job(config, seed=sum(map(ord, name)))
    build = runner.build(config, "verilator")
    out = runner.run_bench(build, "skipconv.sim.bench.tb_engine", job)
    assert out["errors"] == [], "\n".join(out["errors"][:20])
    faults = layers = 0
    for step, (kind, obj, x) in zip(out["steps"], checks):
        if kind == "layer":
            got = jobs.run_result(step, obj, trace=config.trace)
            want = golden.run(obj, x, config.g)
            if config.trace:
                assert want.mismatches(got) == [], step["tag"]
                assert (got.outcome == want.outcome).all(), step["tag"]
            else:
                assert (got.out == want.out).all(), step["tag"]
                assert got.accounting() == want.accounting(), step["tag"]
                assert got.positions == want.positions, step["tag"]
            assert got.cycles > 0
            layers += 1
        elif kind == "fault":
            codes = [m.body[0] for m in step["actual"] if m.type == P.Res.ERROR]
            assert codes == [int(c) for c in obj.codes], step["tag"]
            faults += 1
    assert layers >= 10 and faults >= 50
