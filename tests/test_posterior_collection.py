"""Checkpoint collections: exact round trips, hashes verified on every load, partial runs
resumed, anything foreign refused."""

import hashlib
import json

import pytest
import torch

from bnnkit import CheckpointError, ConfigError
from bnnkit.posterior.collection import Collection

ARCH = {"model": "mlp", "input_shape": [1, 28, 28], "num_classes": 10}


def _state(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(4, 3, generator=g).to(dtype),
            "fc.bias": torch.randn(4, generator=g).to(dtype),
            "bn.num_batches_tracked": torch.tensor(seed)}  # fmt: skip


def test_round_trip_is_exact_and_the_manifest_names_every_file(tmp_path):
    col = Collection.create(tmp_path / "c", ARCH)
    for i, dtype in enumerate([torch.float32, torch.float64, torch.bfloat16]):
        col.add(f"m{i}", _state(i, dtype), "deterministic", seed=i, info={"order": i})
    again = Collection.open(tmp_path / "c")
    assert [m.id for m in again.members] == ["m0", "m1", "m2"]
    for i, (m, s) in enumerate(again):
        ref = _state(i, [torch.float32, torch.float64, torch.bfloat16][i])
        assert all(torch.equal(s[k], ref[k]) and s[k].dtype == ref[k].dtype for k in ref)
        digest = hashlib.sha256((tmp_path / "c" / m.file).read_bytes()).hexdigest()
        assert m.sha256 == digest and m.info == {"order": i} and m.method == "deterministic"
    assert again.vectors().shape == (3, 16)  # integer buffers are not weights


def test_a_changed_or_replaced_member_file_is_refused(tmp_path):
    col = Collection.create(tmp_path / "c", ARCH)
    col.add("a", _state(0), "x")
    col.add("b", _state(1), "x")
    (tmp_path / "c/members/a.safetensors").write_bytes(
        (tmp_path / "c/members/b.safetensors").read_bytes()
    )  # a valid checkpoint, but not the one the manifest recorded
    with pytest.raises(CheckpointError, match="'a'.*does not match the manifest's sha256"):
        Collection.open(tmp_path / "c").load("a")
    raw = bytearray((tmp_path / "c/members/b.safetensors").read_bytes())
    raw[-1] ^= 1
    (tmp_path / "c/members/b.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="'b'.*sha256"):
        Collection.open(tmp_path / "c").load("b")
    with pytest.raises(CheckpointError, match="sha256"):
        list(Collection.open(tmp_path / "c"))  # iterating verifies every member


def test_a_manifest_pointing_outside_is_refused(tmp_path):
    col = Collection.create(tmp_path / "c", ARCH)
    col.add("a", _state(0), "x")
    d = json.loads((tmp_path / "c/manifest.json").read_text())
    d["members"][0]["file"] = "../outside.safetensors"
    (tmp_path / "c/manifest.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="outside the collection"):
        Collection.open(tmp_path / "c").load("a")
    (tmp_path / "d").mkdir()
    (tmp_path / "d/manifest.json").write_text('{"format": "other"}')
    with pytest.raises(CheckpointError, match="not a bnnkit-collection/1 manifest"):
        Collection.open(tmp_path / "d")
    with pytest.raises(CheckpointError, match="no manifest.json"):
        Collection.open(tmp_path / "nothing")


def test_a_killed_run_continues_and_leftovers_are_ignored(tmp_path):
    col = Collection.create(tmp_path / "c", ARCH)
    col.add("a", _state(0), "x")
    # a run killed after writing b's file but before the manifest named it
    (tmp_path / "c/members/b.safetensors").write_bytes(b"torn")
    resumed = Collection.create(tmp_path / "c", ARCH)
    assert len(resumed) == 1 and resumed.missing(["a", "b", "c"]) == ["b", "c"]
    resumed.add("b", _state(1), "x")
    assert torch.equal(
        Collection.open(tmp_path / "c").load("b")["fc.weight"], _state(1)["fc.weight"]
    )
    with pytest.raises(ConfigError, match="another architecture"):
        Collection.create(tmp_path / "c", {**ARCH, "model": "lenet5"})


def test_bad_members_are_refused(tmp_path):
    col = Collection.create(tmp_path / "c", ARCH)
    col.add("a", _state(0), "x")
    with pytest.raises(ConfigError, match="already holds a member 'a'"):
        col.add("a", _state(1), "x")
    with pytest.raises(ConfigError, match="same architecture"):
        col.add("b", {"fc.weight": torch.zeros(4, 3)}, "x")
    bad = _state(2)
    bad["fc.bias"][0] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):
        col.add("c", bad, "x")
    with pytest.raises(ConfigError, match="member id"):
        col.add("../evil", _state(3), "x")
    with pytest.raises(CheckpointError, match="no member 'zzz'"):
        col.load("zzz")
