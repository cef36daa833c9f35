"""Copy a bench's table and figures into the README (between the bench markers).

    python benchmarks/update_readme.py runs/bench

Figures go to docs/figures/; the README section names the command and the date.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

from bnnkit import io

ROOT = Path(__file__).resolve().parents[1]


def main(bench_dir: str) -> None:
    bench = Path(bench_dir)
    cfg = json.loads((bench / "bench_config.json").read_text())
    head, results = (bench / "results.md").read_text().split("\n", 2)[1:]
    made = re.search(r"made (\d{4}-\d{2}-\d{2})", results)
    # the main table and its column note; the per-angle / per-severity tables stay in results.md
    results = results.split("\n### ")[0].strip()
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
    text = readme.read_text()
    new = re.sub(r"<!-- bench:start -->.*<!-- bench:end -->", lambda _: section, text, flags=re.S)
    io.atomic_write_text(readme, new)
    print(f"README updated from {bench}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/bench")
