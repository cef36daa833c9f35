"""`bnnkit bench --reuse DIR`: finished runs of another bench are copied in, never trained
again, and only when they were made with exactly this bench's run settings."""

import json
import shutil
import sqlite3
from dataclasses import replace

import pytest

from bnnkit.bench import BenchConfig, run_bench
from bnnkit.cli import main
from bnnkit.errors import ConfigError
from conftest import install_ood_root


def _cfg(out, **kw):
    base = dict(
        methods=["deterministic", "mc_dropout"],
        method_options={"mc_dropout": {"samples": 2}},
        epochs=1,
        seeds=1,
        subset=300,
        val_size=300,
        test_size=200,
        corruptions=[],
        angles=[0, 90],
        n_rotate=50,
        out=str(out),
        progress=False,
    )
    return BenchConfig(**{**base, **kw})


def _rows(path, method):
    db = sqlite3.connect(path / "results.sqlite")
    try:
        q = "SELECT split, metric, value FROM results WHERE method=? ORDER BY split, metric"
        return db.execute(q, (method,)).fetchall()
    finally:
        db.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """One finished bench; its OOD data the same synthetic set every test's ood_root holds."""
    out = tmp_path_factory.mktemp("reuse") / "a"
    with pytest.MonkeyPatch.context() as mp:
        install_ood_root(tmp_path_factory.mktemp("ood_data"), mp)
        run_bench(_cfg(out), log=lambda *_: None)
    return out


def test_same_runs_are_copied_other_settings_are_trained(source, tmp_path, ood_root):
    out = tmp_path / "b"
    # a kill during an earlier copy left a half-copied directory behind
    (out / "runs" / "deterministic-seed0.reuse-tmp").mkdir(parents=True)
    (out / "runs" / "deterministic-seed0.reuse-tmp" / "junk").write_text("half")
    logs = []
    cfg = _cfg(
        out,
        methods=["deterministic", "mc_dropout", "temperature_scaling"],
        method_options={"mc_dropout": {"samples": 3}},  # another MC-dropout predictive
        reuse=[str(source)],
    )
    table = run_bench(cfg, log=logs.append)
    assert "temperature_scaling" in table
    det_a, det_b = source / "runs" / "deterministic-seed0", out / "runs" / "deterministic-seed0"
    # copied, not retrained: every file byte for byte (progress.json holds the wall-clock
    # start of training, which a second training would not reproduce)
    files = sorted(p.relative_to(det_a) for p in det_a.rglob("*") if p.is_file())
    assert files and sorted(p.relative_to(det_b) for p in det_b.rglob("*") if p.is_file()) == files
    for f in files:
        assert (det_b / f).read_bytes() == (det_a / f).read_bytes(), f
    assert _rows(out, "deterministic") == _rows(source, "deterministic")
    assert not (out / "runs" / "deterministic-seed0.reuse-tmp").exists()
    # MC dropout with 3 samples is another run: trained here, and the log says why
    assert any("not reusing" in m and "'samples': 3" in m for m in logs), logs
    mc = json.loads((out / "runs" / "mc_dropout-seed0" / "config.json").read_text())
    assert mc["method_options"]["samples"] == 3
    assert _rows(out, "mc_dropout") != _rows(source, "mc_dropout")
    assert any(str(det_a) in m and m.startswith("reused") for m in logs)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"epochs": 2}, "epochs: 1 -> 2"),
        ({"n_rotate": 60}, "n_rotate: 50 -> 60"),
        ({"weight_decay": 1e-3}, "weight_decay: .* -> 0.001"),
    ],
)
def test_a_source_scored_otherwise_is_refused_before_any_write(
    source, tmp_path, ood_root, change, match
):
    out = tmp_path / "b"
    cfg = replace(_cfg(out, reuse=[str(source)]), **change)
    with pytest.raises(ConfigError, match=match):
        run_bench(cfg, log=lambda *_: None)
    assert not out.exists()  # the corrected command finds nothing in its way


def test_bad_source_directories(source, tmp_path, ood_root):
    def refused(reuse, match, out=tmp_path / "b"):
        with pytest.raises(ConfigError, match=match):
            run_bench(_cfg(out, reuse=reuse), log=lambda *_: None)
        assert not (tmp_path / "b").exists()

    refused([str(tmp_path / "nope")], "does not exist")
    (tmp_path / "empty").mkdir()
    refused([str(tmp_path / "empty")], "not a bench directory")
    refused([str(source)], "own output directory", out=source)
    for bad in (str(source), None, {str(source): 1}, [""], [None]):
        refused(bad, "list of bench directories")


def test_a_setting_the_source_did_not_record_is_a_difference(source, tmp_path, ood_root):
    """A source written before a setting existed (or edited) cannot be shown to agree."""
    old = tmp_path / "old"
    shutil.copytree(source, old)
    meta = json.loads((old / "bench_config.json").read_text())
    del meta["test_size"], meta["ood_sets"]
    (old / "bench_config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="test_size: not recorded -> 200.*ood_sets"):
        run_bench(_cfg(tmp_path / "b", reuse=[str(old)]), log=lambda *_: None)
    assert not (tmp_path / "b").exists()


def test_cli_flag(source, tmp_path, capsys, ood_root):
    out = tmp_path / "b"
    argv = ["bench", "--methods", "deterministic", "--epochs", "2", "--subset", "300",
            "--val-size", "300", "--test-subset", "200", "--corruptions", "none", "--seeds", "1",
            "--n-rotate", "50", "--out", str(out), "--reuse", str(source), "--quiet"]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "epochs: 1 -> 2" in err and "Traceback" not in err
    assert not out.exists()
    # the flag replaces a config file's list (flags given win)
    cfg_file = tmp_path / "bench.yaml"
    cfg_file.write_text(f"reuse: [{tmp_path / 'not-a-bench'}]\n")
    assert main([*argv, "--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert "epochs: 1 -> 2" in err and "not-a-bench" not in err
