"""The import contract the README states: the plain-PyTorch layers load no Lightning, matplotlib,
Optuna or torchmetrics, and imports point one way along the stated layer order."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "bnnkit"

PLAIN = [
    "bnnkit.nn",
    "bnnkit.models",
    "bnnkit.methods",
    "bnnkit.metrics",
    "bnnkit.laplace",
    "bnnkit.posterior",
    "bnnkit.convert",
    "bnnkit.data",
]
HEAVY = ("lightning", "pytorch_lightning", "lightning_utilities", "matplotlib", "optuna")
HEAVY += ("torchmetrics",)

# The README's order, as stated there (pinned: change both together).
README_ORDER = (
    "`cli -> search -> bench -> train/evaluate/report -> methods -> convert -> "
    "nn/models/metrics/data`",
    "`cli -> report.posterior (figures, page) -> posterior (plain PyTorch math) -> "
    "methods/nn/data`",
)

# module prefix -> layer (the longest matching prefix wins). ``core`` is what every layer may
# use (errors, atomic io, the option tables, Predictive); ``bnnkit`` itself re-exports convert.
LAYER_OF = {
    "bnnkit.errors": "core",
    "bnnkit.io": "core",
    "bnnkit.options": "core",
    "bnnkit.predictive": "core",
    "bnnkit.nn": "leaf",
    "bnnkit.models": "leaf",
    "bnnkit.metrics": "leaf",
    "bnnkit.data": "leaf",
    "bnnkit": "convert",
    "bnnkit.convert": "convert",
    "bnnkit.plan": "convert",
    "bnnkit.methods": "methods",
    "bnnkit.laplace": "methods",
    "bnnkit.posterior": "posterior",
    "bnnkit.train": "run",
    "bnnkit.evaluate": "run",
    "bnnkit.report": "run",
    "bnnkit.report.figures": "figures",
    "bnnkit.report.posterior": "report.posterior",
    "bnnkit.bench": "bench",
    "bnnkit.search": "search",
    "bnnkit.cli": "cli",
}
# the layers each layer imports directly; what they import is allowed too (closure below)
BELOW = {
    "core": set(),
    "leaf": {"core"},
    "convert": {"leaf"},
    "methods": {"convert"},
    "posterior": {"methods"},
    "figures": {"leaf"},
    "run": {"methods", "figures"},
    "report.posterior": {"posterior", "figures"},
    "bench": {"run"},
    "search": {"bench"},
    "cli": {"search", "report.posterior"},
}


def _allowed() -> dict[str, set[str]]:
    out = {}
    for layer in BELOW:
        seen, todo = {layer}, [layer]
        while todo:
            for lower in BELOW[todo.pop()]:
                if lower not in seen:
                    seen.add(lower)
                    todo.append(lower)
        out[layer] = seen
    return out


def _modules() -> dict[str, Path]:
    mods = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = p
    return mods


def _layer(module: str) -> str | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYER_OF:
            return LAYER_OF[".".join(parts[:n])]
    return None


def _imports(module: str, path: Path, known: set[str]):
    """(line, imported bnnkit module or third-party top-level name) for every import statement
    of a file, inside functions too (a lazy import is still an import)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                yield node.lineno, sub if sub in known else target


def test_readme_states_the_pinned_order():
    readme = (ROOT / "README.md").read_text()
    flat = " ".join(readme.split())
    for line in README_ORDER:
        assert line in flat, f"README.md no longer states {line}; update this test with it"
    assert "Nothing in `nn`, `models`, `methods` or `metrics` imports Lightning or matplotlib" in (
        flat
    )


def test_every_module_has_a_layer_and_imports_only_downwards():
    mods = _modules()
    allowed = _allowed()
    unplaced = sorted(m for m in mods if _layer(m) is None)
    assert not unplaced, f"modules without a layer in the stated order: {unplaced}"
    bad = []
    for mod, path in sorted(mods.items()):
        mine = _layer(mod)
        for line, target in _imports(mod, path, set(mods)):
            if not target.startswith("bnnkit"):
                continue
            theirs = _layer(target)
            if theirs not in allowed[mine]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({mine}) imports {target} ({theirs})")
    assert not bad, "imports against the stated layer order:\n" + "\n".join(bad)


def test_plain_pytorch_layers_import_no_heavy_package_even_lazily():
    mods = _modules()
    plain = {"core", "leaf", "convert", "methods", "posterior"}
    bad = []
    for mod, path in sorted(mods.items()):
        if _layer(mod) not in plain:
            continue
        for line, target in _imports(mod, path, set(mods)):
            if target.split(".")[0] in HEAVY:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_importing_the_plain_layers_loads_no_heavy_package():
    """In a fresh interpreter: what the imports really load (dependencies included)."""
    code = (
        f"import sys, json\nimport {', '.join(PLAIN)}\n"
        "print(json.dumps(sorted(m for m in sys.modules "
        f"if m.split('.')[0] in {HEAVY!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == [], f"importing {PLAIN} loaded {loaded[:10]} ({len(loaded)} modules)"


@pytest.mark.parametrize(
    "module,target,ok",
    [
        ("bnnkit.metrics.ood", "bnnkit.train.run", False),
        ("bnnkit.posterior.tools", "bnnkit.report.figures", False),
        ("bnnkit.methods.base", "bnnkit.laplace", True),
        ("bnnkit.search.study", "bnnkit.report.figures", True),
        ("bnnkit.bench", "bnnkit.search.study", False),
        ("bnnkit.report.posterior", "bnnkit.posterior.mmd", True),
        ("bnnkit.evaluate", "bnnkit.posterior.mmd", False),
    ],
)
def test_the_layer_table_says_what_the_readme_says(module, target, ok):
    assert (_layer(target) in _allowed()[_layer(module)]) is ok
