"""Matplotlib figures of a bench: reliability, OOD histograms, corruption and rotation curves."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, ScalarFormatter

from ..metrics import reliability


def _grid(n: int):
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    # matplotlib's object API: no pyplot, no global backend or figure registry touched
    fig = Figure(figsize=(3.2 * cols, 3.0 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat)


def reliability_diagrams(arts: dict[str, dict], path: Path, n_bins: int = 15) -> Path:
    fig, axes = _grid(len(arts))
    for ax, (method, art) in zip(axes, arts.items()):
        conf, acc, count = reliability(art["test_probs"], art["test_labels"], n_bins)
        centers = (torch.arange(n_bins) + 0.5) / n_bins
        mask = count > 0
        ax.bar(
            centers[mask], acc[mask], width=1 / n_bins, edgecolor="k", alpha=0.7, label="accuracy"
        )
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.plot(conf[mask], acc[mask], "r.", ms=4, label="(conf, acc)")
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    fig.suptitle("Reliability diagrams (test set)")
    fig.tight_layout()
    _save(fig, path)
    return path


def ood_histograms(arts: dict[str, dict], path: Path, score: str = "entropy") -> Path:
    fig, axes = _grid(len(arts))
    for ax, (method, art) in zip(axes, arts.items()):
        s_in = art[f"score_in:{score}"]
        ax.hist(s_in.numpy(), bins=40, alpha=0.6, density=True, label="in-dist (test)")
        for key, s_out in art.items():
            if key.startswith("score_out:") and key.endswith(":" + score):
                ax.hist(
                    s_out.numpy(),
                    bins=40,
                    alpha=0.6,
                    density=True,
                    label="OOD " + key.split(":")[1],
                )
        ax.set_title(method, fontsize=9)
        ax.set_xlabel(f"{score} score")
        ax.legend(fontsize=7)
    fig.suptitle(f"OOD detection: {score} of the predictive")
    fig.tight_layout()
    _save(fig, path)
    return path


def _curves(rows, prefix):
    """method -> metric -> level -> list of values (over seeds and, for corruptions, types)."""
    out = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        split = r["split"]
        if not split.startswith(prefix) or split == "corrupt:mean":
            continue
        level = int(split.rsplit(":", 1)[1])
        out[r["method"]][r["metric"]][level].append(r["value"])
    return out


def _plot_curves(rows, prefix, path, xlabel, title, methods, metrics=("accuracy", "nll", "ece")):
    curves = _curves(rows, prefix)
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    for ax, metric in zip(axes, metrics):
        for m in methods:
            if m not in curves:
                continue
            levels = sorted(curves[m][metric])
            ys = [sum(curves[m][metric][lv]) / len(curves[m][metric][lv]) for lv in levels]
            ax.plot(levels, ys, marker="o", ms=3, label=m)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    return path


def corruption_curves(rows, path: Path, methods: list[str], dense: bool = False) -> Path:
    """Accuracy (segmentation: mIoU), NLL and ECE against the corruption severity."""
    metrics = ("miou", "nll", "ece") if dense else ("accuracy", "nll", "ece")
    return _plot_curves(
        rows, "corrupt:", path, "severity", "Mean over corruption types vs severity", methods,
        metrics,
    )  # fmt: skip


def training_curves(curves: dict[str, list[dict]], path: Path) -> Path:
    """Validation NLL and accuracy per epoch, one line per method (mean over its seeds, the
    seeds' range shaded): the evidence that training has converged, or has not."""
    fig = Figure(figsize=(11, 3.8))
    axes = fig.subplots(1, 2)
    for ax, metric, label in zip(
        axes, ("val_nll", "val_acc"), ("validation NLL", "validation accuracy")
    ):
        for method, runs in curves.items():
            runs = [r[metric] for r in runs if r.get(metric)]
            if not runs:
                continue
            epochs = sorted(set.intersection(*(set(r) for r in runs)))
            if not epochs:
                continue
            values = torch.tensor([[r[e] for e in epochs] for r in runs])
            x = [e + 1 for e in epochs]
            (line,) = ax.plot(x, values.mean(0).tolist(), lw=1.4, label=method)
            if len(runs) > 1:
                ax.fill_between(x, values.min(0).values.tolist(), values.max(0).values.tolist(),
                                color=line.get_color(), alpha=0.15, lw=0)  # fmt: skip
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Training curves (mean over seeds; shaded: the seeds' range)")
    fig.tight_layout()
    _save(fig, path)
    return path


def segmentation_maps(arts: dict[str, dict], path: Path, score: str = "entropy") -> Path:
    """Uncertainty maps of a few fixed test images: one row per image; columns: the image, the
    ground truth (void black), the anomaly mask (the held-out classes' pixels), then per method
    its prediction and its ``score`` map. Every ``score`` panel shares one colour scale, shown
    by the colour bar: ``entropy`` from 0 to ln C (the uniform distribution), ``mutual_info``
    from 0 to the largest value of any method's map (single-member methods, whose mutual
    information is 0, are left out)."""
    import math

    methods = [m for m, a in arts.items() if a.get("maps")]
    if score == "mutual_info":
        methods = [m for m in methods if arts[m].get("members", 1) > 1]
    if not methods:
        raise ValueError(f"no {score} maps to draw")
    first = arts[methods[0]]["maps"]
    n_img = len(first)
    n_cls = len(arts[methods[0]]["class_names"])
    if score == "entropy":
        vmax = math.log(n_cls)
    else:
        vmax = max(float(mm[score].float().max()) for m in methods for mm in arts[m]["maps"])
        vmax = max(vmax, 1e-6)
    cmap = matplotlib.colormaps["tab20"].resampled(max(n_cls, 2))
    cols = 3 + 2 * len(methods)
    fig = Figure(figsize=(1.9 * cols, 1.5 * n_img + 0.6))
    axes = fig.subplots(n_img, cols, squeeze=False)

    def labels(t):
        t = t.long()
        rgb = torch.as_tensor(cmap(t.clamp(max=n_cls - 1).numpy())[..., :3])
        rgb[t >= n_cls] = 0.0  # void
        return rgb

    shown = None
    for i in range(n_img):
        m0 = first[i]
        anomaly = m0["anomaly"]
        if anomaly is None:
            anomaly = torch.zeros_like(m0["truth"], dtype=torch.bool)
        panels = [
            ("image", m0["image"].permute(1, 2, 0).numpy(), None),
            ("truth", labels(m0["truth"]).numpy(), None),
            ("anomaly", anomaly.float().numpy(), "gray"),
        ]
        for m in methods:
            mm = arts[m]["maps"][i]
            panels.append((f"{m}\nprediction", labels(mm["prediction"]).numpy(), None))
            panels.append((f"{m}\n{score}", mm[score].float().numpy(), "magma"))
        for j, (title, img, cm) in enumerate(panels):
            ax = axes[i, j]
            if cm == "magma":
                shown = ax.imshow(img, cmap=cm, vmin=0.0, vmax=vmax, interpolation="nearest")
            else:
                ax.imshow(img, cmap=cm, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
    fig.suptitle(f"Fixed test images: prediction and {score} (one colour scale, 0 to {vmax:.3g})")
    fig.tight_layout()
    if shown is not None:
        fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.6, label=score)
    _save(fig, path)
    return path


def rotation_curves(rows, path: Path, methods: list[str]) -> Path:
    return _plot_curves(
        rows, "rotate:", path, "rotation angle (degrees)", "Test set rotated by an angle", methods
    )


def _save(fig, path) -> None:
    """Atomic figure write: a temporary file in the same folder, then a rename."""
    from pathlib import Path

    from .. import io

    path = Path(path)
    io.atomic_write(
        path,
        lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix[1:] or "png", bbox_inches="tight"),
    )


def pareto_plot(
    trials: list[dict],
    front: list[dict],
    baselines: list[dict],
    path: Path,
    second: tuple[str, str] = ("ood_auroc", "search OOD AUROC (higher is better)"),
    latency: tuple[str, str] = ("latency_ms", "predict latency, ms per batch (log)"),
) -> Path:
    """Validation NLL and search OOD AUROC (``second``: another key and its axis label)
    against predict latency (``latency``: key and label): every completed trial, the Pareto
    front joined, the baselines (``name`` key) marked."""
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    panels = (
        (axes[0], "val_nll", "validation NLL (lower is better)"),
        (axes[1], *second),
    )
    lat, lat_label = latency
    for ax, key, label in panels:
        ax.scatter([t[lat] for t in trials], [t[key] for t in trials], s=14,
                   color="0.7", label="trials")  # fmt: skip
        # markers only: a front over three objectives is not monotone in a 2-D projection
        ax.scatter([t[lat] for t in front], [t[key] for t in front], s=30, color="C0",
                   label="Pareto front (3 objectives)")  # fmt: skip
        for k, b in enumerate(baselines):
            ax.scatter([b[lat]], [b[key]], marker="*", s=120, color=f"C{k + 1}",
                       label=b["name"], zorder=3)  # fmt: skip
        ax.set_xscale("log")
        # plain numbers at 1-2-5 steps: the default labels every minor tick and overlaps
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(lat_label)
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle("Placement search")
    fig.tight_layout()
    _save(fig, path)
    return path


def weight_pca_plot(panels: list[tuple[str, dict[str, torch.Tensor], torch.Tensor]],
                    path: Path) -> Path:  # fmt: skip
    """One scatter panel per ``(title, {name: [n, 2] coordinates}, explained ratio [2])``; the
    first name of each panel (the reference) in grey, the others in colour."""
    fig = Figure(figsize=(5.2 * len(panels), 4.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, sets, ratio) in zip(axes, panels):
        colours = matplotlib.colormaps["tab20"].colors
        markers = ("x", "+", "^", "s", "d", "v", "o")
        for i, (name, xy) in enumerate(sets.items()):
            xy = xy.detach().cpu()
            style = {"color": "0.6", "s": 10} if i == 0 else {
                "s": 16, "color": colours[(i - 1) % len(colours)],
                "marker": markers[(i - 1) // len(colours) % len(markers)]}  # fmt: skip
            ax.scatter(xy[:, 0], xy[:, 1], label=name, alpha=0.8, **style)
        ax.set_title(title)
        ax.set_xlabel(f"PC1 ({100 * float(ratio[0]):.1f}% of the reference's variance)")
        ax.set_ylabel(f"PC2 ({100 * float(ratio[1]):.1f}%)")
    if len(panels[-1][1]) > 1:
        axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    _save(fig, path)
    return path


def path_plot(curves: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
              path: Path) -> Path:  # fmt: skip
    """Loss and accuracy along linear paths: ``{label: (t, loss, accuracy)}``."""
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
    for label, (t, loss, acc) in curves.items():
        axes[0].plot(t, loss, marker="o", ms=3, label=label)
        axes[1].plot(t, 100 * acc, marker="o", ms=3, label=label)
    axes[0].set_ylabel("test NLL")
    axes[1].set_ylabel("test accuracy %")
    for ax in axes:
        ax.set_xlabel("t (network a at 0, network b at 1)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return path


def plane_plot(plane: dict[str, torch.Tensor], labels: list[str], path: Path) -> Path:
    """Contours of the loss on the plane through three networks (:func:`loss_plane` output)."""
    fig = Figure(figsize=(5.6, 4.6))
    ax = fig.subplots()
    loss = plane["loss"].clamp(max=float(plane["loss"].min()) + 3.0)  # keep the basin readable
    cs = ax.contourf(plane["u"], plane["v"], loss, levels=20, cmap="viridis_r")
    fig.colorbar(cs, ax=ax, label="test NLL (clipped at min + 3)")
    pts = plane["points"]
    ax.scatter(pts[:, 0], pts[:, 1], color="red", marker="o", zorder=3)
    for (u, v), lab in zip(pts.tolist(), labels):
        ax.annotate(lab, (u, v), color="red", xytext=(0, 6), textcoords="offset points",
                    ha="center")  # fmt: skip
    ax.set_xlabel("u")
    ax.set_ylabel("v")
    fig.tight_layout()
    _save(fig, path)
    return path
