"""The results store: one SQLite row per (method, dataset, seed, split, metric)."""

from __future__ import annotations

import csv
import io
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from .. import io as files

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    method  TEXT NOT NULL,
    dataset TEXT NOT NULL,
    model   TEXT NOT NULL,
    seed    INTEGER NOT NULL,
    split   TEXT NOT NULL,
    metric  TEXT NOT NULL,
    value   REAL NOT NULL,
    PRIMARY KEY (method, dataset, model, seed, split, metric)
);
CREATE TABLE IF NOT EXISTS runs (
    method  TEXT NOT NULL,
    dataset TEXT NOT NULL,
    model   TEXT NOT NULL,
    seed    INTEGER NOT NULL,
    run_dir TEXT NOT NULL,
    config  TEXT NOT NULL,
    PRIMARY KEY (method, dataset, model, seed)
);
"""


class ResultStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def has(self, method: str, dataset: str, model: str, seed: int) -> bool:
        cur = self.db.execute(
            "SELECT 1 FROM runs WHERE method=? AND dataset=? AND model=? AND seed=?",
            (method, dataset, model, seed),
        )
        return cur.fetchone() is not None

    def add_run(self, method, dataset, model, seed, run_dir, config_json, rows: Iterable[dict]):
        """Insert a run's rows and its record in one transaction (all or nothing)."""
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?)",
                [(method, dataset, model, seed, r["split"], r["metric"], r["value"]) for r in rows],
            )
            self.db.execute(
                "INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?)",
                (method, dataset, model, seed, str(run_dir), config_json),
            )

    def rows(self, **where) -> list[dict]:
        clause = " AND ".join(f"{k}=?" for k in where) or "1=1"
        cur = self.db.execute(
            f"SELECT method, dataset, model, seed, split, metric, value FROM results "
            f"WHERE {clause} ORDER BY method, seed, split, metric",
            tuple(where.values()),
        )
        cols = ["method", "dataset", "model", "seed", "split", "metric", "value"]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    def to_csv(self, path: str | Path) -> None:
        """All rows as CSV, written atomically (the SQLite file itself is transactional)."""
        rows = self.rows()
        buf = io.StringIO()
        w = csv.DictWriter(
            buf, fieldnames=["method", "dataset", "model", "seed", "split", "metric", "value"]
        )
        w.writeheader()
        w.writerows(rows)
        files.atomic_write_text(Path(path), buf.getvalue())
