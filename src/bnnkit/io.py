"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

A nested structure (dicts, lists, tuples, numbers, strings, None, tensors) is split into a
flat ``{key: tensor}`` table and a JSON skeleton that refers to the tensors by key. Both go
into one ``.safetensors`` file (the JSON as its metadata). Loading never unpickles: the
decoder only rebuilds those types, so a foreign or hostile file cannot run code.
Writes are atomic and durable: a temporary file in the same folder, written, fsynced, then moved
over the target with ``os.replace`` and the folder fsynced; a crash leaves the old file or the new
one, never a torn one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError, ConfigError

FORMAT = "bnnkit-checkpoint"
VERSION = 1


#: keys that mark an encoded value; a user dict with any of them is stored as a key/value list
_MARKERS = frozenset({"__tensor__", "__tuple__", "__float__", "__dtype__", "__dict__"})


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str):
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return {"__float__": repr(obj)}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not _MARKERS.intersection(obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {
            "__dict__": [
                [_encode(k, tensors, path), _encode(v, tensors, f"{path}.{k}")]
                for k, v in obj.items()
            ]
        }
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, Path):
        return str(obj)
    raise CheckpointError(
        f"cannot store {type(obj).__name__} at {path or 'top level'} in a checkpoint: only "
        "tensors, numbers, strings, None, lists, tuples and dicts are allowed (no pickle)"
    )


def _decode(obj: Any, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
        if "__dtype__" in obj:
            dt = getattr(torch, obj["__dtype__"], None)
            if not isinstance(dt, torch.dtype):
                raise CheckpointError(f"unknown dtype {obj['__dtype__']!r} in checkpoint")
            return dt
        if "__dict__" in obj:
            out = {}
            for k, v in obj["__dict__"]:
                k = _decode(k, tensors)
                out[k] = _decode(v, tensors)
            return out
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _fsync_path(path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory
        if not directory:
            raise
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, fsync, then move the result over ``path`` in one step.

    The temporary file is created with mode 0o666 so that the process umask applies, as for
    any file the user's programs create (no global umask is read or changed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = os.stat(tmp).st_mode & 0o777  # 0o666 less the umask
        write(str(tmp))
        if os.stat(tmp).st_mode & 0o777 != mode:
            # a writer that replaced the file (safetensors writes a private 0o600 file) would
            # otherwise leave a model only its owner can read, unlike every other output
            os.chmod(tmp, mode)
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent, directory=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


#: the file :func:`exclusive` locks inside a directory
LOCK_NAME = ".bnnkit.lock"


@contextlib.contextmanager
def exclusive(directory: str | os.PathLike, refusal: str) -> Iterator[None]:
    """Hold an advisory lock on ``directory`` (``flock`` on its :data:`LOCK_NAME`) for the
    block, creating the directory if needed. A second process that asks while this one holds
    it is refused at once with a :class:`ConfigError`: ``refusal`` (what to do instead) after
    the holder's pid, instead of both writing the same files. The kernel drops the lock when
    its holder ends, killed or not, so a left-over lock file never blocks a later call."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_NAME, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "pid unknown"
            raise ConfigError(
                f"{directory} is in use by another bnnkit process ({holder}); {refusal}"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        yield


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def save(obj: Any, path: str | os.PathLike, kind: str = "generic") -> None:
    """Save a nested structure of tensors and plain values to one safetensors file."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(obj, tensors, "")
    meta = {"format": FORMAT, "version": str(VERSION), "kind": kind, "tree": json.dumps(skeleton)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def load(path: str | os.PathLike, kind: str | None = None, map_location="cpu") -> Any:
    """Load what :func:`save` wrote; raise :class:`CheckpointError` on anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(
                    f"{path} is not a bnnkit checkpoint (no '{FORMAT}' header); bnnkit only "
                    "loads files it wrote, and never unpickles (e.g. torch.save files)"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except SafetensorError as e:
        raise CheckpointError(
            f"{path} is truncated or not a safetensors file ({e}); "
            "restore it from a backup or re-run the job that wrote it"
        ) from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r} checkpoint, expected {kind!r}")
    try:
        tree = json.loads(meta["tree"])
        obj = _decode(tree, tensors)
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} has a damaged header: {e}") from e
    if map_location not in (None, "cpu"):
        obj = _to(obj, map_location)
    return obj


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to(v, device) for v in obj)
    return obj
