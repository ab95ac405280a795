"""The batch emulator the method searches use equals the golden model, bit for bit."""

import itertools
import zlib

import numpy as np
import pytest

from skipconv.sw import golden
from skipconv.sw.methods.emulate import COUNTERS, emulate
from skipconv.sw.randlayer import random_input, random_layer

FEATURE_SETS = [(), ("early_term",), ("velcro",), ("perforation",), ("zero_pred",),
                ("early_term", "velcro", "zero_pred"), ("early_term", "velcro", "perforation")]


@pytest.mark.parametrize("features,et,g", [
    (f, et, g) for f, et, g in itertools.product(FEATURE_SETS, ("exact", "predictive"), (1, 2, 3))
    if "early_term" in f or (et == "exact" and g == 1)])
def test_emulate_equals_golden(features, et, g):
    rng = np.random.default_rng(zlib.crc32(repr((features, et, g)).encode()))
    for signed in (False, True):
        layer = random_layer(rng, cin=3, cout=5, h=9, w=7, features=features, et=et, g=g,
                             act_signed=signed, stride=1 + (g == 3))
        x = np.stack([random_input(rng, layer.in_shape, signed=signed) for _ in range(4)])
        r = emulate(layer, x, g, macs=True)
        total = {k: 0 for k in COUNTERS}
        for n in range(len(x)):
            gr = golden.run(layer, x[n], g)
            assert np.array_equal(gr.out, r.out[n])
            assert np.array_equal(gr.macs, r.macs[n])
            for k in COUNTERS:
                total[k] += getattr(gr, k)
        assert total == r.counters
        assert sum(r.counters[k] for k in COUNTERS[1:]) == r.counters["dense"]


def test_emulate_refuses_a_single_image():
    layer = random_layer(np.random.default_rng(1))
    with pytest.raises(ValueError, match="x.shape"):
        emulate(layer, np.zeros(layer.in_shape, np.int64))
