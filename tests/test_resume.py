"""A run killed at any moment (SIGKILL, no clean-up) and continued with --resume ends with bitwise
the same weights and metrics as an uninterrupted run; re-running without --resume refuses; a
finished run can be extended with more epochs."""

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from bnnkit import io
from bnnkit.cli import main

ARGS = [
    "train", "--method", "mc_dropout", "--option", "samples=2", "--subset", "512",
    "--batch-size", "64", "--lr", "3e-3", "--seed", "3", "--device", "cpu", "--quiet",
]  # fmt: skip


def _cmd(out, epochs, *extra):
    return [sys.executable, "-m", "bnnkit.cli", *ARGS, "--epochs", str(epochs), "--out",
            str(out), *extra]  # fmt: skip


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _weights(run):
    return io.load(run / "model.safetensors", kind="uqmodel")["state_dict"]


def _last_val(run):
    logs = sorted((run / "logs").iterdir())[-1] / "metrics.csv"
    rows = [r for r in csv.DictReader(logs.open()) if r.get("val_nll")]
    return rows[-1]["val_nll"], rows[-1]["val_acc"], rows[-1]["epoch"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(_cmd(out, 3), env=_env(), check=True, timeout=300)
    return out


@pytest.mark.parametrize("delay", [0.0, 0.35])
def test_sigkill_then_resume_is_bitwise_identical(reference, tmp_path, delay):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out, 3), env=_env())
    ckpt = out / "checkpoints" / "last.safetensors"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(delay + random.Random(int(delay * 100)).uniform(0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "meta.json").exists(), "the run finished before it could be killed"
    # without --resume the interrupted run is not started over
    again = subprocess.run(_cmd(out, 3), env=_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "interrupted run" in again.stderr
    assert again.stderr.count("\n") == 1 and "Traceback" not in again.stderr
    subprocess.run(_cmd(out, 3, "--resume"), env=_env(), check=True, timeout=300)
    resumed = sorted((out / "logs").iterdir())[-1] / "metrics.csv"
    epochs = {int(r["epoch"]) for r in csv.DictReader(resumed.open())}
    assert 0 not in epochs and epochs, epochs  # continued, not started over
    ref, got = _weights(reference), _weights(out)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert _last_val(out) == _last_val(reference)


def test_finished_run_is_extended_with_more_epochs_only(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*ARGS, "--epochs", "1", "--out", str(out)]) == 0
    steps = io.load(out / "checkpoints" / "last.safetensors", kind="lightning")["global_step"]
    assert main([*ARGS, "--epochs", "1", "--out", str(out)]) == 2
    assert "finished run" in capsys.readouterr().err
    assert main([*ARGS, "--epochs", "2", "--lr", "1e-3", "--out", str(out), "--resume"]) == 2
    assert "different config (train.lr" in capsys.readouterr().err
    assert main([*ARGS, "--epochs", "2", "--out", str(out), "--resume"]) == 0
    assert json.loads((out / "meta.json").read_text())["epochs"] == 2
    ckpt = io.load(out / "checkpoints" / "last.safetensors", kind="lightning")
    assert ckpt["global_step"] == 2 * steps
    assert json.loads((out / "config.json").read_text())["train"]["epochs"] == 2
