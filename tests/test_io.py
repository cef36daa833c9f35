import pytest
import torch

from bnnkit import CheckpointError, io
from bnnkit.methods import ModelSpec, UQModel, build_method


def test_roundtrip_nested_structure(tmp_path):
    obj = {
        "state": {"w": torch.randn(3, 2), "step": torch.tensor(7)},
        "opt": [{0: {"exp_avg": torch.ones(2)}, 1: {}}, {"betas": (0.9, 0.999)}],
        "epoch": 3,
        "best": float("inf"),
        "name": "run",
        "none": None,
        "dtype": torch.float16,
    }
    path = tmp_path / "c.safetensors"
    io.save(obj, path, kind="test")
    back = io.load(path, kind="test")
    torch.testing.assert_close(back["state"]["w"], obj["state"]["w"])
    assert back["opt"][0][0]["exp_avg"].tolist() == [1.0, 1.0]
    assert set(back["opt"][0]) == {0, 1}  # integer keys survive
    assert back["opt"][1]["betas"] == (0.9, 0.999)
    assert back["best"] == float("inf") and back["epoch"] == 3 and back["none"] is None
    assert back["dtype"] is torch.float16


def test_shared_tensors_are_stored(tmp_path):
    t = torch.randn(4)
    io.save({"a": t, "b": t[:2]}, tmp_path / "s.safetensors")
    back = io.load(tmp_path / "s.safetensors")
    torch.testing.assert_close(back["b"], t[:2])


def test_refuses_pickle_and_damaged_files(tmp_path):
    p = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, p)
    with pytest.raises(CheckpointError, match="truncated or not a safetensors|not a bnnkit"):
        io.load(p)
    good = tmp_path / "good.safetensors"
    io.save({"w": torch.randn(100, 100)}, good, kind="test")
    data = good.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        io.load(trunc)
    with pytest.raises(CheckpointError, match="expected 'uqmodel'"):
        io.load(good, kind="uqmodel")
    with pytest.raises(CheckpointError, match="does not exist"):
        io.load(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="cannot store object"):
        io.save({"x": object()}, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_foreign_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(3)}, p)
    with pytest.raises(CheckpointError, match="not a bnnkit checkpoint"):
        io.load(p)


def test_uqmodel_roundtrip_preserves_predictions(tmp_path):
    spec = ModelSpec("lenet5", (1, 28, 28), 10, (0.5,), (0.5,))
    model = build_method("batch_ensemble", spec)
    model.temperature.fill_(1.7)
    path = tmp_path / "m.safetensors"
    model.save(path)
    back = UQModel.load(path)
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(back.predict(x).probs, model.predict(x).probs)
    assert back.method == "batch_ensemble" and float(back.temperature) == pytest.approx(1.7)


def test_uqmodel_mismatched_weights(tmp_path):
    spec = ModelSpec("lenet5", (1, 28, 28), 10)
    model = build_method("deterministic", spec)
    blob = {"describe": model.describe(), "extra": {}, "state_dict": {"bogus": torch.ones(1)}}
    io.save(blob, tmp_path / "m.safetensors", kind="uqmodel")
    with pytest.raises(CheckpointError, match="does not match"):
        UQModel.load(tmp_path / "m.safetensors")


MARKERS = ["__tensor__", "__tuple__", "__float__", "__dtype__", "__dict__"]


@pytest.mark.parametrize("marker", MARKERS)
def test_user_dicts_with_marker_keys_round_trip(tmp_path, marker):
    """A user's dict may use any key, the encoder's own markers included."""
    values = ["t0", ["a", 1], "inf", "float32", [[1, 2]], torch.arange(3), (1, 2), float("nan")]
    for v in values:
        obj = {"user": {marker: v, "other": 1}, "alone": {marker: v}}
        path = tmp_path / "m.safetensors"
        io.save(obj, path)
        back = io.load(path)
        for key in ("user", "alone"):
            got = back[key][marker]
            if isinstance(v, torch.Tensor):
                assert torch.equal(got, v)
            elif isinstance(v, float):
                assert got != got  # nan
            else:
                assert got == v and type(got) is type(v)
        assert back["user"]["other"] == 1


def test_atomic_write_keeps_the_old_file_on_failure_and_respects_umask(tmp_path):
    import os

    path = tmp_path / "f.txt"
    io.atomic_write_text(path, "old")

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io.atomic_write(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temporary left behind
    old = os.umask(0o027)
    try:
        io.atomic_write_text(tmp_path / "g.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "g.txt").stat().st_mode & 0o777 == 0o640
    # safetensors replaces the temporary with a private 0o600 file: saved models and
    # checkpoints get the umask's mode like every other output
    old = os.umask(0o022)
    try:
        io.save({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644
