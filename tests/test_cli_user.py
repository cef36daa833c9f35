"""The command line as a new user meets it: a refused bench or search writes nothing that
would refuse the corrected command, a signal stops a training as stopped (never as finished or
failed) and the same command continues it exactly, config and plan files that cannot be read
are refused on one line."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from bnnkit.cli import build_parser, main
from bnnkit.cli import train as train_cmd
from bnnkit.train import is_complete
from bnnkit.train.chunks import ChunkControl

TRAIN = ["train", "--method", "mc_dropout", "--model", "mlp", "--epochs", "3", "--subset", "256",
         "--batch-size", "64", "--val-size", "200", "--quiet"]  # fmt: skip


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err: str) -> bool:
    lines = err.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("bnnkit: ") and "Traceback" not in err


# ------------------------------------------------------------------ refused, then corrected
def test_a_refused_bench_leaves_nothing_and_the_corrected_command_runs(capsys, tmp_path, ood_root):
    """Refusals that only a run can make (subset beyond the data, Lightning's set-up) come
    before the bench writes its settings: the corrected command is not refused in turn as 'a
    bench made with other settings'."""
    conf = tmp_path / "bench.yaml"
    conf.write_text("corruptions: [gaussian_noise]\n")
    out = tmp_path / "bench"
    common = ["bench", "--config", conf, "--methods", "deterministic", "--model", "mlp",
              "--epochs", "1", "--seeds", "1", "--subset", "128", "--val-size", "200",
              "--test-subset", "100", "--n-corrupt", "10", "--n-rotate", "10", "--angles", "0",
              "--quiet", "--out", out]  # fmt: skip
    for extra, match in (
        (["--subset", "10000000"], "is more than the"),
        (["--train-option", "strategy=nonsense"], "Lightning refused"),
        (["--dataset", "nope"], "unknown data set 'nope'"),
    ):
        code, _, err = run_cli(capsys, *common, *extra)
        assert code == 2 and match in err and one_line_error(err), err
        assert not out.exists(), sorted(p.name for p in out.iterdir())
    code, _, err = run_cli(capsys, *common)
    assert code == 0, err
    assert (out / "results.csv").is_file()


def test_a_refused_search_leaves_nothing_and_the_corrected_command_runs(capsys, tmp_path):
    out = tmp_path / "search"
    common = ["search", "--model", "mlp", "--epochs", "1", "--subset", "128", "--batch-size",
              "64", "--val-size", "200", "--trials", "1", "--n-ood", "50", "--latency-batch",
              "8", "--no-baselines", "--quiet", "--out", out]  # fmt: skip
    code, _, err = run_cli(capsys, *common, "--train-option", "strategy=nonsense")
    assert code == 2 and "Lightning refused" in err and one_line_error(err), err
    assert not out.exists()
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    code, _, err = run_cli(capsys, *common[:-1], blocker)
    assert code == 2 and "not writable" in err and "--out" in err and one_line_error(err), err
    code, _, err = run_cli(capsys, *common)
    assert code == 0, err
    assert (out / "plan.json").is_file()


# ------------------------------------------------------------------ signals
def _stop_after_first_epoch(monkeypatch, stop):
    """Make the training stop itself the way a user's signal would, once its first epoch ended."""
    original = ChunkControl.on_train_epoch_end

    def epoch_end(self, trainer, pl_module):
        original(self, trainer, pl_module)
        if trainer.current_epoch == 0:
            stop()

    monkeypatch.setattr(ChunkControl, "on_train_epoch_end", epoch_end)


def _sigterm():
    os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler is installed during fit


def _ctrl_c():
    raise KeyboardInterrupt  # what Python makes of SIGINT


@pytest.mark.parametrize(
    "stop, status, word", [(_sigterm, 143, "terminated"), (_ctrl_c, 130, "interrupted")]
)
def test_a_signal_stops_training_as_stopped_and_resume_ends_bitwise_equal(
    capsys, tmp_path, monkeypatch, stop, status, word
):
    """Lightning turns SIGTERM into exit status 0 and Ctrl-C into a silent exit(1): the command
    must say it stopped, with a status that is neither success nor failure, and --resume must
    end with the weights of a run that was never stopped."""
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C after catching it
    code, _, err = run_cli(capsys, *TRAIN, "--out", tmp_path / "ref")
    assert code == 0, err
    with monkeypatch.context() as m:
        _stop_after_first_epoch(m, stop)
        try:
            code, _, err = run_cli(capsys, *TRAIN, "--out", tmp_path / "run")
        finally:
            signal.signal(signal.SIGINT, sigint)
    assert code == status, err
    assert word in err and "--resume" in err and one_line_error(err), err
    assert not is_complete(tmp_path / "run")
    code, _, err = run_cli(capsys, *TRAIN, "--out", tmp_path / "run", "--resume")
    assert code == 0, err
    ref = load_file(tmp_path / "ref" / "model.safetensors")
    got = load_file(tmp_path / "run" / "model.safetensors")
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_a_signal_in_bench_does_not_promise_a_resume_flag(capsys, tmp_path, monkeypatch, ood_root):
    """`bnnkit bench` has no --resume: its message says to re-run the same command."""
    with monkeypatch.context() as m:
        _stop_after_first_epoch(m, _ctrl_c)
        try:
            code, _, err = run_cli(
                capsys, "bench", "--methods", "deterministic", "--model", "mlp", "--epochs",
                "2", "--seeds", "1", "--subset", "128", "--val-size", "200", "--quiet",
                "--out", tmp_path / "bench",
            )  # fmt: skip
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    assert code == 130 and "re-run the same command" in err and "--resume" not in err, err


# ------------------------------------------------------------------ files that cannot be read
@pytest.mark.parametrize(
    "text, match",
    [
        (b"a: [1\n", "not valid YAML at line 2, column 1"),
        (b"a: b: c\n", "not valid YAML at line 1, column 5"),
        (b"\xff\xfe\x00method: x\n", "not a UTF-8 text file"),
    ],
)
@pytest.mark.parametrize("flag", ["--config", "--plan"])
def test_an_unreadable_config_or_plan_file_is_one_line(capsys, tmp_path, text, match, flag):
    path = tmp_path / "file"
    path.write_bytes(text)
    code, _, err = run_cli(capsys, "train", flag, path, "--out", tmp_path / "run")
    assert code == 2 and one_line_error(err), err
    if flag == "--config" or "UTF-8" in match:
        assert match in err, err
    assert not (tmp_path / "run").exists()


def test_a_flag_not_given_does_not_override_the_config_file(tmp_path):
    """Only a flag given wins over the YAML file: no --quiet leaves the file's progress."""
    conf = tmp_path / "run.yaml"
    conf.write_text("train: {progress: false, epochs: 3}\n")
    a = build_parser().parse_args(["train", "--config", str(conf), "--out", str(tmp_path)])
    cfg = train_cmd.config(a)
    assert cfg.train.progress is False and cfg.train.epochs == 3
    a = build_parser().parse_args(
        ["train", "--config", str(conf), "--epochs", "2", "--out", str(tmp_path)]
    )
    assert train_cmd.config(a).train.epochs == 2
    conf.write_text("train: {progress: true}\n")
    a = build_parser().parse_args(["train", "--config", str(conf), "--quiet", "--out", "x"])
    assert train_cmd.config(a).train.progress is False
    assert json.loads(json.dumps(cfg.to_dict()))["train"]["progress"] is False
