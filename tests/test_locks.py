"""One process writes an output directory at a time: a second `bnnkit bench` or `bnnkit train`
into a directory another process is writing is refused before it writes anything, and a killed
holder never leaves a lock behind that blocks the next call."""

import json
import signal
import subprocess
import sys
import textwrap

import pytest

from bnnkit import io
from bnnkit.bench import BenchConfig, run_bench
from bnnkit.errors import ConfigError
from bnnkit.train import train_run
from bnnkit.train.config import run_config

pytestmark = pytest.mark.timeout(240)

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from bnnkit import io
    with io.exclusive(sys.argv[1], "unused"):
        print("holding", flush=True)
        time.sleep(120)
    """
)


@pytest.fixture
def holder():
    """Start a process that holds the lock of a directory; yields (start, procs)."""
    procs = []

    def start(directory):
        p = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(directory)], stdout=subprocess.PIPE, text=True
        )
        procs.append(p)
        assert p.stdout.readline().strip() == "holding"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def _kill(p):
    p.send_signal(signal.SIGKILL)
    p.wait()


def test_second_holder_is_refused_with_the_first_ones_pid(tmp_path, holder):
    p = holder(tmp_path / "d")
    with pytest.raises(ConfigError, match=rf"in use by another bnnkit process \(pid {p.pid}\);"):
        with io.exclusive(tmp_path / "d", "wait"):
            pass
    # the kernel drops the lock of a killed holder: the file left behind blocks nothing
    _kill(p)
    assert (tmp_path / "d" / io.LOCK_NAME).is_file()
    with io.exclusive(tmp_path / "d", "wait"):
        assert (tmp_path / "d" / io.LOCK_NAME).read_text() == f"pid {__import__('os').getpid()}\n"


def test_released_on_exit_and_on_error_within_one_process(tmp_path):
    for _ in range(2):
        with io.exclusive(tmp_path, "wait"):
            with io.exclusive(tmp_path / "inner", "wait"):  # another directory: independent
                pass
    with pytest.raises(RuntimeError):
        with io.exclusive(tmp_path, "wait"):
            raise RuntimeError("boom")
    with io.exclusive(tmp_path, "wait"):
        pass


def _bench(out):
    return BenchConfig(
        methods=["deterministic"],
        epochs=1,
        seeds=1,
        subset=200,
        val_size=200,
        test_size=100,
        corruptions=[],
        angles=[0],
        n_rotate=20,
        out=str(out),
        progress=False,
    )


def test_bench_into_a_directory_in_use_is_refused_then_runs(tmp_path, holder, ood_root):
    out = tmp_path / "bench"
    p = holder(out)
    with pytest.raises(ConfigError, match="another --out"):
        run_bench(_bench(out), log=lambda *_: None)
    # refused before its first write: no settings, no store, no run
    assert sorted(x.name for x in out.iterdir()) == [io.LOCK_NAME]
    _kill(p)
    assert run_bench(_bench(out), log=lambda *_: None) is not None
    assert (out / "runs" / "deterministic-seed0" / "model.safetensors").is_file()


def test_train_into_a_run_in_use_is_refused_then_trains(tmp_path, holder):
    run = tmp_path / "run"
    cfg = run_config(
        method="deterministic",
        model="lenet5",
        seed=0,
        data={"dataset": "fashion_mnist", "val_size": 200, "subset": 200},
        train={"epochs": 1},
    )
    p = holder(run)
    with pytest.raises(ConfigError, match=f"pid {p.pid}"):
        train_run(cfg, run)
    assert not (run / "config.json").exists()
    _kill(p)
    train_run(cfg, run)
    assert json.loads((run / "meta.json").read_text())["epochs"] == 1
