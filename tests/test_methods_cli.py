"""``skipconv optimize`` / ``skipconv report`` end to end on a small run."""

import json

import pytest

from skipconv.sw.cli import main


def test_optimize_help_lists_methods(capsys):
    with pytest.raises(SystemExit) as e:
        main(["optimize", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for m in ("zero_pred", "snapea", "velcro", "perforation", "joint"):
        assert m in out


def test_optimize_refuses_a_bad_eps(tmp_path, capsys):
    assert main(["optimize", "lenet", "--method", "snapea", "--eps", "-1", "-o",
                 str(tmp_path)]) == 2
    assert "--eps -1.0" in capsys.readouterr().err


def test_report_of_an_empty_folder_fails_clearly(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no run" in capsys.readouterr().err


def test_optimize_then_report(tmp_path, capsys):
    out = tmp_path / "lenet" / "velcro"
    rc = main(["optimize", "lenet", "--method", "velcro", "--eps", "1", "-o", str(out),
               "--calib", "60", "--test", "60", "--workers", "1", "--quiet"])
    res = json.loads(capsys.readouterr().out)
    assert rc == (0 if res["within_eps"] else 1)
    assert res["mac_reduction"] > 0
    layers = sorted((out / "layers").glob("*.npz"))
    assert len(layers) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test"]["mac_reduction"] == res["mac_reduction"]
    assert main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "| lenet | velcro |" in md
    for png in ("accuracy_vs_macs", "spatial_correlation", "variance_hist",
                "savings_by_reason", "zero_maps"):
        data = (tmp_path / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    rows = (tmp_path / "report.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[0].startswith("model,run,eps")


def test_optimize_search_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["optimize", "--help"])
    out = capsys.readouterr().out
    assert "--search {augmented,calib}" in out and "--val-margin" in out
    assert main(["optimize", "lenet", "--method", "perforation", "--val-margin", "0", "-o",
                 str(tmp_path)]) == 2
    assert "--val-margin 0.0: must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["optimize", "lenet", "--method", "zero_pred", "--search", "test", "-o",
              str(tmp_path)])
    assert "invalid choice: 'test'" in capsys.readouterr().err
