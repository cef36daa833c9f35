"""bnnkit posterior end to end on tiny real data: collect (killed and resumed), canonicalize,
MMD between collections."""

import os
import signal
import subprocess
import sys
import time

import torch

from bnnkit.posterior.collection import Collection


def _bnnkit(*args, **kw):
    return subprocess.run([sys.executable, "-m", "bnnkit.cli", *args], capture_output=True,
                          text=True, timeout=600, **kw)  # fmt: skip


COLLECT = ["--model", "mlp", "--epochs", "1", "--subset", "300", "--quiet"]


def test_collect_killed_and_resumed_then_canonicalize_and_compare(tmp_path):
    ref = tmp_path / "ref"
    cmd = [sys.executable, "-m", "bnnkit.cli", "posterior", "collect", "--out", str(ref),
           "--members", "6", "--chunk", "1", *COLLECT]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it once the first members are in
        if (ref / "manifest.json").is_file() and len(Collection.open(ref)) >= 2:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    killed_at = len(Collection.open(ref))
    assert 2 <= killed_at < 6
    r = _bnnkit("posterior", "collect", "--out", str(ref), "--members", "6", "--chunk", "3",
                *COLLECT)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    col = Collection.open(ref)
    assert [m.id for m in col.members] == sorted(m.id for m in col.members)
    assert len(col) == 6 and len({m.seed for m in col.members}) == 6
    # a member trained after the restart equals the same member of an uninterrupted run
    one = _bnnkit("posterior", "collect", "--out", str(tmp_path / "one"), "--members", "6",
                  "--chunk", "6", *COLLECT)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    other = Collection.open(tmp_path / "one")
    for mid in ("ref-0000", "ref-0005"):
        a, b = col.load(mid), other.load(mid)
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    r = _bnnkit("posterior", "canonicalize", str(ref), "--out", str(tmp_path / "canon"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = _bnnkit("posterior", "mmd", str(ref), str(tmp_path / "canon"), "--space", "function",
                "--probe", "50")  # fmt: skip
    assert r.returncode == 0 and "no difference detected" in r.stdout, r.stdout + r.stderr
    # a trained bnnkit model's posterior samples join the same format and can be compared
    r = _bnnkit("train", "--method", "batch_ensemble", "--model", "mlp", "--epochs", "1",
                "--subset", "300", "--out", str(tmp_path / "be"), "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    r = _bnnkit("posterior", "collect", "--from-run", str(tmp_path / "be"), "--out",
                str(tmp_path / "be_samples"))  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    be = Collection.open(tmp_path / "be_samples")
    assert (
        len(be) == 4
        and be.arch == col.arch
        and {m.method for m in be.members} == {"batch_ensemble"}
    )
    r = _bnnkit("posterior", "mmd", str(ref), str(tmp_path / "be_samples"))
    assert r.returncode == 0 and "MMDAgg (weight space" in r.stdout, r.stderr[-2000:]
    r = _bnnkit("posterior", "mmd", str(ref), str(tmp_path / "nothing"))
    assert r.returncode != 0 and "not a collection" in r.stderr and "Traceback" not in r.stderr
