"""``skipconv run`` and ``skipconv demo`` end to end (golden and protocol devices)."""

import json

import pytest

from skipconv.sw import data, export, zoo
from skipconv.sw.cli import main


@pytest.fixture(scope="module")
def net_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lenet")
    net = export.export(zoo.get_model("lenet", progress=False), data.mnist_split("calib").x,
                        spec={"zoo": "lenet"})
    net.save(folder)
    x = net.layer_inputs(data.mnist_split("test").x[:1])[1][0]
    net.write_case(1, x, folder / "case_conv2.npz")
    return folder


def test_run_network_on_protocol_device_with_compare(net_dir, tmp_path, capsys):
    rc = main(["run", str(net_dir), "--device", "responder", "--compare", "--images", "3",
               "--quiet", "--json", "-o", str(tmp_path)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 3 and summary["mismatch"] is None and summary["compared"]
    assert [s["name"] for s in summary["layers"]] == ["conv1", "conv2", "conv3"]
    assert summary["totals"]["dense"] == 3 * (156800 + 320000 + 115200)
    assert json.loads((tmp_path / "results.json").read_text())["images"] == 3


def test_run_case_file_writes_result(net_dir, tmp_path, capsys):
    rc = main(["run", str(net_dir / "case_conv2.npz"), "--device", "golden", "--compare",
               "-o", str(tmp_path)])
    assert rc == 0
    assert "bit-exact" in capsys.readouterr().out
    assert (tmp_path / "case_conv2.result.npz").is_file()


def test_run_unknown_device_and_bad_folder(net_dir, tmp_path):
    from skipconv.sw.driver.device import DeviceError
    with pytest.raises(DeviceError, match="device 'board'"):
        main(["run", str(net_dir), "--device", "board", "--quiet"])
    with pytest.raises(SystemExit, match="neither manifest.json"):
        main(["run", str(tmp_path), "--quiet"])


def test_demo_golden_smoke(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--device", "golden", "--images", "2", "--test-images", "100",
               "--calib-images", "100",
               "--no-progress", "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "bit-exact" in text and "total" in text
    summary = json.loads((out / "results.json").read_text())
    assert summary["bit_exact"] and summary["images"] == 2
    t = summary["totals"]
    assert t["performed"] < t["dense"]                    # the configuration skips work
    assert (out / "report.md").is_file() and (out / "savings_by_reason.png").is_file()


def test_demo_dense_baseline_is_measured_where_the_device_counts_cycles():
    """The demo's dense-engine cycles come from running the dense layers on the same device
    (the responder counts cycles); on the golden device, which counts none, they stay ideal."""
    from skipconv.sw.driver.demo import _measure_dense_baseline, demo_config
    from skipconv.sw.driver.device import GoldenDevice, open_device
    from skipconv.sw.driver.offload import dense_engine_cycles, offload
    from skipconv.sw.methods.snapea import exact

    net = export.export(zoo.get_model("lenet", progress=False), data.mnist_split("calib").x)
    layers = [L if L.act_signed else exact(L) for L in net.layers]
    x = data.mnist_split("test").x[:1]
    config = demo_config()
    dev = open_device("responder", config)
    res = offload(net, dev, x, layers=layers, progress=False)
    base = _measure_dense_baseline(net, dev, x, res, progress=False)
    assert base["kind"] == "measured" and base["mismatch"] is None
    dense = offload(net, open_device("responder", config), x, progress=False)
    assert [s.dense_cycles for s in res.layers] == [s.cycles for s in dense.layers]

    gold = offload(net, GoldenDevice(config), x, layers=layers, progress=False)
    assert _measure_dense_baseline(net, GoldenDevice(config), x, gold, False)["kind"] == "ideal"
    assert [s.dense_cycles for s in gold.layers] == [dense_engine_cycles(L, config)
                                                      for L in net.layers]


def test_emulate_opens_a_pty_and_stops(capsys):
    assert main(["emulate", "--seconds", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "emulated board on /dev/" in out and "served; 0 NAK(s)" in out
