"""Checkpoint collections: approximate-posterior samples as plain networks, one safetensors file
per member and a manifest.

Layout of a collection directory::

    manifest.json            format, the architecture (bnnkit model name, input shape, classes,
                             model options), and one entry per member: id, file, sha256, method,
                             seed, and free-form ``info`` (data order, source run, metrics)
    members/<id>.safetensors the member's state dict (bnnkit checkpoint format, no pickle)

Every member is a state dict of the *same* plain architecture (effective weights), so that
symmetry removal and distances apply to all methods alike. Adding a member writes its file
atomically, then rewrites the manifest atomically: a run killed in between leaves a file the
manifest does not name, which is ignored and overwritten by the next run, so a collection run
continues where it stopped (:meth:`Collection.missing`). Loading checks the member's sha256
against the manifest and refuses any difference (a corrupt or substituted file), and refuses
files the manifest does not list. Members are read one at a time (:meth:`Collection.__iter__`):
collections larger than memory stream.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import io
from ..errors import CheckpointError, ConfigError

FORMAT = "bnnkit-collection/1"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Member:
    id: str
    file: str
    sha256: str
    method: str
    seed: int | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Collection:
    """A directory of networks sharing one architecture (see the module docstring)."""

    def __init__(self, root: str | Path, arch: dict[str, Any], members: list[Member]) -> None:
        self.root = Path(root)
        self.arch = arch
        self.members = members

    # ------------------------------------------------------------------ open / create
    @classmethod
    def create(cls, root: str | Path, arch: dict[str, Any]) -> Collection:
        """Open ``root`` for writing: a new collection, or the existing one if it holds the same
        architecture (a resumed run); another architecture is refused."""
        root = Path(root)
        if (root / "manifest.json").is_file():
            col = cls.open(root)
            if col.arch != arch:
                raise ConfigError(
                    f"{root} holds a collection of another architecture ({col.arch} vs {arch}); "
                    "use another directory"
                )
            return col
        col = cls(root, dict(arch), [])
        col._write_manifest()
        return col

    @classmethod
    def open(cls, root: str | Path) -> Collection:
        root = Path(root)
        path = root / "manifest.json"
        if not path.is_file():
            raise CheckpointError(f"{root} is not a collection (no manifest.json)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is damaged: {e}") from e
        if d.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a {FORMAT} manifest")
        try:
            members = [Member(**m) for m in d["members"]]
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{path} has a malformed member entry: {e}") from e
        return cls(root, d["arch"], members)

    def _write_manifest(self) -> None:
        d = {"format": FORMAT, "arch": self.arch, "members": [vars(m) for m in self.members]}
        io.atomic_write_text(self.root / "manifest.json", json.dumps(d, indent=1))

    # ------------------------------------------------------------------ write
    def has(self, member_id: str) -> bool:
        return any(m.id == member_id for m in self.members)

    def missing(self, ids: list[str]) -> list[str]:
        """The ids of ``ids`` not yet in the collection (what a resumed run still has to do)."""
        have = {m.id for m in self.members}
        return [i for i in ids if i not in have]

    def add(
        self,
        member_id: str,
        state: dict[str, torch.Tensor],
        method: str,
        seed: int | None = None,
        info: dict[str, Any] | None = None,
    ) -> Member:
        if not _ID.match(member_id):
            raise ConfigError(
                f"member id {member_id!r} must be 1-128 letters, digits, '_', '-' or '.', "
                "starting with a letter or digit"
            )
        if self.has(member_id):
            raise ConfigError(f"the collection already holds a member {member_id!r}")
        if self.members:
            self._check_same_keys(state, self.members[0].id)
        for k, v in state.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise ConfigError(f"member {member_id!r}: {k} holds NaN or inf; not stored")
        rel = f"members/{member_id}.safetensors"
        path = self.root / rel
        io.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, path, "member")
        m = Member(member_id, rel, _sha256(path), method, seed, dict(info or {}))
        self.members.append(m)
        self._write_manifest()
        return m

    def _check_same_keys(self, state, other_id) -> None:
        ref = self.load(other_id)
        if set(ref) != set(state) or any(ref[k].shape != state[k].shape for k in ref):
            raise ConfigError(
                "every member of a collection has the same architecture; this state dict "
                f"differs from member {other_id!r} in its keys or shapes"
            )

    # ------------------------------------------------------------------ read
    def __len__(self) -> int:
        return len(self.members)

    def load(self, member_id: str) -> dict[str, torch.Tensor]:
        """One member's state dict, after checking its file against the manifest's sha256."""
        m = next((m for m in self.members if m.id == member_id), None)
        if m is None:
            raise CheckpointError(f"the collection at {self.root} has no member {member_id!r}")
        path = (self.root / m.file).resolve()
        if self.root.resolve() not in path.parents:
            raise CheckpointError(f"member {member_id!r} points outside the collection: {m.file}")
        if not path.is_file():
            raise CheckpointError(f"member {member_id!r}: {m.file} is missing")
        digest = _sha256(path)
        if digest != m.sha256:
            raise CheckpointError(
                f"member {member_id!r}: {m.file} does not match the manifest's sha256 (corrupt "
                "or replaced); delete the member's entry and file and collect it again"
            )
        return io.load(path, kind="member")

    def __iter__(self) -> Iterator[tuple[Member, dict[str, torch.Tensor]]]:
        """Members one at a time (``(entry, state dict)``), each verified."""
        for m in list(self.members):
            yield m, self.load(m.id)

    def vectors(self, keys: list[str] | None = None, members: list[str] | None = None):
        """``[n, d]`` float64: each member's tensors (``keys``, default all floating-point
        parameters except BatchNorm running statistics) flattened and concatenated."""
        chosen = members if members is not None else [m.id for m in self.members]
        rows = []
        for mid in chosen:
            s = self.load(mid)
            ks = keys or [k for k, v in s.items() if v.is_floating_point() and "running" not in k]
            rows.append(torch.cat([s[k].reshape(-1).to(torch.float64) for k in ks]))
        return torch.stack(rows)
