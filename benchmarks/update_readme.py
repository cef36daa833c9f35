"""Copy a bench's table and figures into the README.

    python benchmarks/update_readme.py runs/bench
    python benchmarks/update_readme.py --converged runs/fmnist_converged runs/mnist_converged

The first form fills the default-benchmark section (between the bench markers; figures go to
docs/figures/). The second fills the converged-results section (between the converged markers,
added before the default benchmark on first use) with the main table of each finished converged
bench. Each section names its command and date.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

from bnnkit import io

ROOT = Path(__file__).resolve().parents[1]


def _replace(text: str, name: str, section: str, before: str) -> str:
    """``text`` with the block between ``<!-- name:start -->`` and ``<!-- name:end -->``
    replaced by ``section``; a missing block is inserted before the line ``before``."""
    pattern = rf"<!-- {name}:start -->.*<!-- {name}:end -->"
    if re.search(pattern, text, flags=re.S):
        return re.sub(pattern, lambda _: section, text, flags=re.S)
    if before not in text:
        sys.exit(f"error: README.md has neither the {name} markers nor {before!r}")
    return text.replace(before, section + "\n\n" + before, 1)


def _main_table(bench: Path) -> tuple[dict, str, str]:
    """A finished bench's config, its results.md header line and the main table with its
    column note (the tables after the first ``###`` stay in results.md)."""
    results_md = bench / "results.md"
    if not results_md.is_file():
        sys.exit(
            f"error: {results_md} does not exist: the bench has not finished; run its "
            "command again until it prints the table"
        )
    cfg = json.loads((bench / "bench_config.json").read_text())
    head, results = results_md.read_text().split("\n", 2)[1:]
    return cfg, results.split("\n### ")[0].strip(), head


def converged(bench_dirs: list[str]) -> None:
    parts = []
    for bench_dir in bench_dirs:
        cfg, table, _ = _main_table(Path(bench_dir))
        name = Path(bench_dir).name
        parts.append(
            f"### {cfg['dataset']}, {cfg['model']}\n\n"
            f"`bnnkit bench --config benchmarks/configs/{name}.yaml` (output `{bench_dir}`): "
            f"{cfg['epochs']} epochs on the whole training set but {cfg['val_size']:,} "
            f"validation images, {cfg['seeds']} seeds, the whole test set.\n\n" + table
        )
    section = (
        "<!-- converged:start -->\n"
        "## Converged results\n\n"
        "Every method trained on the whole training set with the converged recipe (15 epochs: "
        "every method's validation NLL ends within 0.005 of its best epoch but MFVI's on MNIST, "
        "whose best is epoch 4; the curves, the MNIST-C and per-corruption tables, the papers' "
        "numbers beside these, each paper's claim answered with seed-paired confidence "
        'intervals and the placement search at this recipe are in BENCHMARKS.md, "Converged '
        'Fashion-MNIST and MNIST"). Regenerate this section with '
        f"`python benchmarks/update_readme.py --converged {' '.join(bench_dirs)}`.\n\n"
        + "\n\n".join(parts)
        + "\n<!-- converged:end -->"
    )
    readme = ROOT / "README.md"
    text = _replace(readme.read_text(), "converged", section, "<!-- bench:start -->")
    io.atomic_write_text(readme, text)
    print(f"README converged section updated from {', '.join(bench_dirs)}")


def main(bench_dir: str) -> None:
    bench = Path(bench_dir)
    cfg, results, _ = _main_table(bench)
    made = re.search(r"made (\d{4}-\d{2}-\d{2})", results)
    fig_out = ROOT / "docs" / "figures"
    fig_out.mkdir(parents=True, exist_ok=True)
    figs = []
    for name in ["reliability.png", "ood_hist.png", "corruption.png", "rotation.png"]:
        src = bench / "figures" / name
        if src.is_file():
            shutil.copy(src, fig_out / name)
            figs.append(f"![{name[:-4]}](docs/figures/{name})")
    section = (
        "<!-- bench:start -->\n"
        "## The default benchmark\n\n"
        f"`make bench` (= `bnnkit bench`): {cfg['dataset']}, {cfg['model']}, methods "
        f"{', '.join(cfg['methods'])}; {cfg['epochs']} epochs on {cfg['subset'] or 'all'} "
        f"training images, {cfg['seeds']} seeds, corruptions {', '.join(cfg['corruptions'])} "
        f"on {cfg['n_corrupt']} test images; made {made.group(1) if made else '?'}. "
        "Regenerate this section with "
        f"`python benchmarks/update_readme.py {bench_dir}`; accuracy, NLL and ECE per rotation "
        f"angle and corruption severity are in `{bench_dir}/results.md`.\n\n"
        "**A short budget, a first look**: the networks are far from converged (LeNet-5 at "
        "about 83% on Fashion-MNIST, where it converges near 91%), which flatters methods that "
        "widen the predictive; compare methods on the converged benches "
        "(`benchmarks/configs/fmnist_converged.yaml`, `mnist_converged.yaml`: full training "
        "sets, 15 epochs, 3 seeds; BENCHMARKS.md).\n\n"
        + results
        + "\n\n"
        + "\n".join(figs)
        + "\n<!-- bench:end -->"
    )
    readme = ROOT / "README.md"
    new = _replace(readme.read_text(), "bench", section, "## The default benchmark")
    io.atomic_write_text(readme, new)
    print(f"README updated from {bench}")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--converged"]:
        if len(args) < 2:
            sys.exit("error: --converged needs the converged bench directories")
        converged(args[1:])
    else:
        main(args[0] if args else "runs/bench")
