"""Layer packages and case files: every validation rule, corruption, atomic writes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from skipconv.sw import golden, layer as layer_mod, randlayer
from skipconv.sw.layer import COPY, CONST, Layer, LayerError


@pytest.fixture
def good():
    rng = np.random.default_rng(0)
    return randlayer.random_layer(rng, cin=2, cout=3, h=6, w=6,
                                  features=("early_term", "velcro"), et="exact")


@pytest.fixture
def perforated():
    rng = np.random.default_rng(1)
    return randlayer.random_layer(rng, cin=2, cout=3, h=6, w=6, features=("perforation",))


def bad(layer, **changes):
    return dataclasses.replace(layer, **changes)


def _neg_start_violation(layer):
    """A neg_start one before the last positive tap of channel 0."""
    ns = layer.neg_start.copy()
    ordered = layer.w.reshape(layer.cout, -1)[0][layer.order[0]]
    ns[0] = int(np.nonzero(ordered > 0)[0][-1])
    return ns


# Each case: (builder of the bad layer, regex the message must match). The regex names the
# field and its value.
CASES = {
    "weight range": (lambda L: bad(L, w=np.where(L.w == L.w.max(), 128, L.w)),
                     r"w\[.*\] = 128: above the maximum 127"),
    "weight shape": (lambda L: bad(L, w=L.w[:, :, :, :2]), r"w.shape = \(3, 2, 3, 2\)"),
    "cin mismatch": (lambda L: bad(L, in_shape=(5, 6, 6)), r"Cin must match the input's 5"),
    "bias range": (lambda L: bad(L, b=np.array([0, 1 << 31, 0])),
                   r"b\[1\] = 2147483648: above the maximum"),
    "bias shape": (lambda L: bad(L, b=np.zeros(4)), r"b.shape = \(4,\): must be \(3,\)"),
    "stride": (lambda L: bad(L, stride=0), r"stride = 0: must be in 1\.\.64"),
    "pad": (lambda L: bad(L, pad=3), r"pad = 3: must be in 0\.\.2"),
    "too small": (lambda L: bad(L, in_shape=(2, 1, 6), pad=0), r"smaller than the kernel"),
    "M zero": (lambda L: bad(L, M=np.array([1, 0, 1])), r"M\[1\] = 0: below the minimum 1"),
    "M big": (lambda L: bad(L, M=np.array([1, 65536, 1])), r"M\[1\] = 65536: above"),
    "sh": (lambda L: bad(L, sh=np.array([48, 0, 0])), r"sh\[0\] = 48: above the maximum 47"),
    "out_bits": (lambda L: bad(L, out_bits=0), r"out_bits = 0: must be in 1\.\.16"),
    "kind value": (lambda L: bad(L, kind=np.full(L.kind.shape, 3)), r"kind\[.*\] = 3: above"),
    "kind shape": (lambda L: bad(L, kind=L.kind[:, :2]), r"kind.shape"),
    "const range": (lambda L: bad(L, const=np.where(L.kind == CONST, 256, 0)),
                    r"const = 256: CONST values must be in 0\.\.255"),
    "const missing": (lambda L: bad(L, const=None), r"const = None: required when kind"),
    "p one": (lambda L: bad(L, p=1, leader=np.zeros(L.kind.shape, bool)), r"p = 1"),
    "p big": (lambda L: bad(L, p=9, leader=np.zeros(L.kind.shape, bool)), r"p = 9"),
    "leader missing": (lambda L: bad(L, p=2, leader=None), r"leader = None: required when p"),
    "leader shape": (lambda L: bad(L, p=2, leader=np.zeros((3, 2, 2), bool)), r"leader.shape"),
    "et mode": (lambda L: bad(L, et="sometimes"), r"et = 'sometimes': must be one of"),
    "order not permutation": (
        lambda L: bad(L, order=np.where(L.order == 1, 0, L.order)),
        r"order\[0\] = 'tap 0 appears 2 times': must be a permutation of 0\.\.17"),
    "order range": (lambda L: bad(L, order=L.order + 1), r"order\[.*\] = 18: above the maximum"),
    "neg_start positive after": (lambda L: bad(L, neg_start=_neg_start_violation(L)),
                                 r"neg_start\[0\] = \d+: tap order\[0\]\[\d+\] = \d+ has "
                                 r"positive weight \d+ at or after neg_start"),
    "neg_start range": (lambda L: bad(L, neg_start=np.array([19, 0, 0])),
                        r"neg_start\[0\] = 19: above the maximum 18"),
    "exact on signed": (lambda L: bad(L, act_signed=True), r"et = 'exact': exact early "
                        r"termination needs a non-negative input"),
    "signed neg_start": (lambda L: bad(L, act_signed=True, et="predictive",
                                       spec=np.zeros(3, int), th=np.zeros(3, int)),
                         r"neg_start\[\d\] = \d+: a signed input allows only neg_start = "
                         r"\|T\| = 18"),
    "spec missing": (lambda L: bad(L, et="predictive", spec=None, th=np.zeros(3, int)),
                     r"spec = None: required when et is 'predictive'"),
    "spec range": (lambda L: bad(L, et="predictive", spec=np.array([19, 0, 0]),
                                 th=np.zeros(3, int)), r"spec\[0\] = 19: above"),
    "th range": (lambda L: bad(L, et="predictive", spec=np.zeros(3, int),
                               th=np.array([-(1 << 31) - 1, 0, 0])), r"th\[0\] = "
                 r"-2147483649: below"),
    "act_bits": (lambda L: bad(L, act_bits=1), r"act_bits = 1: must be in 2\.\.16"),
    "float weights": (lambda L: bad(L, w=L.w + 0.5), r"w = 'float64': must hold integers"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validation_rule_names_field_and_value(good, case):
    build, pattern = CASES[case]
    with pytest.raises(LayerError, match=pattern):
        build(good).validate()


PERF_CASES = {
    "copy and compute mixed": (
        lambda L: bad(L, kind=np.where(np.arange(3)[:, None, None] == 0, 0, L.kind)),
        r"kind\[:, \d+, \d+\] = 'COPY and COMPUTE': the perforation mask is per \(y, x\)"),
    "nn target perforated": (lambda L: bad(L, nn=_nn_to_perforated(L)),
                             r"nn\[\d+, \d+\] = \(\d+, \d+\): an NN target must be a computed"),
    "nn outside": (lambda L: bad(L, nn=np.full(L.nn.shape, 6)),
                   r"nn\[\d+, \d+\] = \(6, 6\): target outside the 6x6 ofmap"),
    "nn missing": (lambda L: bad(L, nn=None), r"nn = None: required when kind has COPY"),
    "zero_pred with perforation": (
        lambda L: bad(L, p=2, leader=np.zeros(L.kind.shape, bool)),
        r"p = 2: zero prediction cannot be combined with perforation"),
}


def _nn_to_perforated(L):
    perf = (L.kind == COPY).any(axis=0)
    y, x = np.argwhere(perf)[0]
    nn = L.nn.copy()
    nn[perf] = (y, x)
    return nn


@pytest.mark.parametrize("case", sorted(PERF_CASES))
def test_plan_rules_name_field_and_value(perforated, case):
    build, pattern = PERF_CASES[case]
    with pytest.raises(LayerError, match=pattern):
        build(perforated).validate()


def test_spec_must_be_multiple_of_g():
    rng = np.random.default_rng(2)
    L = randlayer.random_layer(rng, features=("early_term",), et="predictive", g=1)
    L = bad(L, spec=np.full(L.cout, 3))
    L.validate(g=1)
    L.validate(g=3)
    with pytest.raises(LayerError, match=r"spec\[0\] = 3: must be a multiple of g = 2"):
        L.validate(g=2)


def test_input_shape_and_range(good):
    x = np.zeros(good.in_shape, np.int64)
    good.validate(x=x)
    with pytest.raises(LayerError, match=r"x.shape = \(2, 6, 5\)"):
        good.validate(x=x[:, :, :5])
    with pytest.raises(LayerError, match=r"x\[0, 0, 0\] = -1: below the minimum 0"):
        good.validate(x=x - 1)
    signed = bad(good, act_signed=True, et="off")
    with pytest.raises(LayerError, match=r"= 128: above the maximum 127"):
        signed.validate(x=x + 128)


def test_large_layer_checks_every_block():
    """Order, neg_start and weight checks go block by block on large tables: a bad value in
    the last block is found, and the errors keep their precedence across blocks."""
    rng = np.random.default_rng(3)
    L = randlayer.random_layer(rng, cin=256, cout=120, h=3, w=3, k=3, pad=1,
                               features=("early_term",), et="exact")
    t = L.taps
    assert L.cout > 2 * ((1 << 17) // t)          # at least three blocks of rows
    L.validate()
    last = L.cout - 1
    order = L.order.copy()
    order[last, :2] = order[last, 0]
    with pytest.raises(LayerError, match=rf"order\[{last}\] = 'tap \d+ appears 2 times'"):
        bad(L, order=order).validate()
    # A range error in a later block wins over a permutation error in an earlier one.
    order[0, :2] = order[0, 0]
    order[last, 5] = -1
    with pytest.raises(LayerError, match=rf"order\[{last}, 5\] = -1: below the minimum 0"):
        bad(L, order=order).validate()
    order[last, 5] = t
    with pytest.raises(LayerError, match=rf"order\[{last}, 5\] = {t}: above the maximum"):
        bad(L, order=order).validate()
    ns = L.neg_start.copy()
    ordered = L.w.reshape(L.cout, -1)[last][L.order[last]]
    ns[last] = int(np.nonzero(ordered > 0)[0][-1])
    with pytest.raises(LayerError, match=rf"neg_start\[{last}\] = \d+: tap order\[{last}\]"):
        bad(L, neg_start=ns).validate()
    for value, why in ((128, "above the maximum 127"), (-129, "below the minimum -128")):
        w = L.w.copy()
        w[last, -1, -1, -1] = value
        with pytest.raises(LayerError, match=rf"w\[{last}, 255, 2, 2\] = {value}: {why}"):
            bad(L, w=w).validate()


def test_package_round_trip(tmp_path, good):
    good.meta = {"s_x": 0.5, "source": "conv1"}
    good.name = "conv1"
    layer_mod.save(tmp_path / "l.npz", good)
    back = layer_mod.load(tmp_path / "l.npz")
    assert back.name == "conv1" and back.meta == good.meta
    for k, v in good.case_arrays().items():
        np.testing.assert_array_equal(back.case_arrays()[k], v)


def test_package_refuses_truncated_and_flipped_files(tmp_path, good):
    path = tmp_path / "l.npz"
    layer_mod.save(path, good)
    blob = path.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(LayerError, match="trunc.npz.*not a readable .npz"):
        layer_mod.load(tmp_path / "trunc.npz")
    # Flip one byte inside the weights' data: caught by the zip CRC or by our checksum.
    flipped = bytearray(blob)
    start = blob.index(b"w.npy")
    flipped[start + 200] ^= 0x40
    (tmp_path / "flip.npz").write_bytes(bytes(flipped))
    with pytest.raises(LayerError, match="(checksum|not a readable)"):
        layer_mod.load(tmp_path / "flip.npz")


def test_package_checksum_catches_consistent_tampering(tmp_path, good):
    """A re-zipped file with a changed array but the old checksum is refused."""
    path = tmp_path / "l.npz"
    layer_mod.save(path, good)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["b"] = arrays["b"] + 1
    np.savez(tmp_path / "tampered.npz", **arrays)
    with pytest.raises(LayerError, match="checksum = '[0-9a-f]{64}': does not match"):
        layer_mod.load(tmp_path / "tampered.npz")


def test_package_refuses_other_version(tmp_path, good):
    import json
    path = tmp_path / "l.npz"
    layer_mod.save(path, good)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    header = json.loads(str(arrays["header"]))
    header["version"] = 99
    arrays["header"] = np.str_(json.dumps(header, sort_keys=True))
    del arrays["checksum"]
    arrays["checksum"] = np.str_(layer_mod._checksum(arrays))
    np.savez(tmp_path / "v99.npz", **arrays)
    with pytest.raises(LayerError, match="header.version = 99"):
        layer_mod.load(tmp_path / "v99.npz")


def test_invalid_layer_is_never_written(tmp_path, good):
    path = tmp_path / "l.npz"
    layer_mod.save(path, good)
    before = path.read_bytes()
    with pytest.raises(LayerError):
        layer_mod.save(path, bad(good, stride=0))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["l.npz"]   # no temporary left behind


def test_interrupted_write_leaves_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    layer_mod.atomic_write_bytes(path, b"old")

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        layer_mod.atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_case_file_round_trip_and_cli(tmp_path, good):
    rng = np.random.default_rng(3)
    x = randlayer.random_input(rng, good.in_shape)
    layer_mod.save_case(tmp_path / "case.npz", good, x)
    L, x2 = layer_mod.load_case(tmp_path / "case.npz")
    np.testing.assert_array_equal(x, x2)
    want = golden.run(good, x, g=2)
    proc = subprocess.run([sys.executable, "-m", "skipconv.sw.cli", "golden",
                           str(tmp_path / "case.npz"), "--g", "2", "-o",
                           str(tmp_path / "res.npz")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "MACs dense" in proc.stdout
    assert want.mismatches(golden.Result.from_npz(tmp_path / "res.npz")) == []


def test_case_file_unknown_array_and_missing_x(tmp_path, good):
    arrays = good.case_arrays()
    np.savez(tmp_path / "nox.npz", **arrays)
    with pytest.raises(LayerError, match="x = None: required array is missing"):
        layer_mod.load_case(tmp_path / "nox.npz")
    np.savez(tmp_path / "extra.npz", x=np.zeros(good.in_shape, int), bogus=np.int64(1), **arrays)
    with pytest.raises(LayerError, match="array name = 'bogus': not a field"):
        layer_mod.load_case(tmp_path / "extra.npz")


def test_cli_golden_reports_bad_case(tmp_path, good):
    arrays = good.case_arrays()
    arrays["stride"] = np.int64(0)
    np.savez(tmp_path / "bad.npz", x=np.zeros(good.in_shape, int), **arrays)
    proc = subprocess.run([sys.executable, "-m", "skipconv.sw.cli", "golden",
                           str(tmp_path / "bad.npz"), "-o", str(tmp_path / "r.npz")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "stride = 0" in proc.stderr
    assert not (tmp_path / "r.npz").exists()
