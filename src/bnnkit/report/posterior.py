"""``bnnkit posterior report``: a Markdown page with PNG figures comparing collections of networks
with a reference collection (Laurent et al., ICLR 2024): MMD in weight space before and after
symmetry removal and in function space, modes, functional diversity in and out of
distribution, the largest-weight-index diagnostic, weights in 2-D, loss along linear paths and on
a plane through three networks.

Everything intermediate is a collection on disk under ``out`` (canonical and aligned forms), so a
killed report continues and a second report over the same collections recomputes only tables.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import io
from ..data import load_bundle
from ..errors import ConfigError
from ..metrics import accuracy, auroc, entropy_score, nll
from ..options import Option, OptionTable, declared_by
from ..posterior.collect import build_from
from ..posterior.collection import Collection
from ..posterior.mmd import mmd2, mmd_agg_test, pairwise
from ..posterior.modes import (
    barrier_matrix,
    count_modes,
    largest_weight_index,
    loss_plane,
    pairwise_mutual_information,
    path_losses,
    uniformity_pvalue,
)
from ..posterior.permutation import align
from ..posterior.scaling import balance, symmetry_specs
from ..posterior.tools import canonical_collection, example_input, member_probs, pca
from ..predictive import Predictive
from . import figures

REPORT_OPTIONS = OptionTable(
    "posterior report",
    [
        Option("reference", "str", None, "the reference collection (directory)", required=True),
        Option("out", "str", "runs/posterior/report", "output directory"),
        Option("dataset", "str", "fashion_mnist", "data set of the networks"),
        Option("probe", "int", 500, "probe images for function-space MMD and mutual "
               "information (test set, and each OOD set)", low=2),
        Option("modes_members", "int", 16, "members per collection for the barrier matrix "
               "(n (n - 1) / 2 paths)", low=2),
        Option("modes_threshold", "float", 0.05, "a barrier below this (nats of test NLL) joins "
               "two networks into one mode", low=0.0, low_open=True),
        Option("loss_images", "int", 1000, "test images for losses along paths and on the "
               "plane", low=2),
        Option("path_points", "int", 11, "points along each interpolation path", low=2),
        Option("plane_grid", "int", 17, "grid points per side of the loss plane", low=2),
        Option("alpha", "float", 0.05, "level of the MMD tests", low=0.0, high=1.0,
               low_open=True, high_open=True),
        Option("seed", "int", 0, "seed of probes, permutation tests and planes", low=0),
    ],
)  # fmt: skip


@dataclass
@declared_by(REPORT_OPTIONS)
class PosteriorReportConfig:
    """A posterior report: one field per option of :data:`REPORT_OPTIONS`, plus the named
    collections to compare with the reference."""

    collections: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        REPORT_OPTIONS.resolve({o.name: getattr(self, o.name) for o in REPORT_OPTIONS})
        if not isinstance(self.collections, dict):
            raise ConfigError(
                f"collections must be a mapping NAME -> DIR, got {self.collections!r}"
            )
        for name in self.collections:
            if not name or "/" in name or name == "reference":
                raise ConfigError(f"collection name {name!r} is not usable as a folder name")


def _median_distance(v: torch.Tensor) -> float:
    d = pairwise(v, 2).sqrt()
    off = d[~torch.eye(len(d), dtype=torch.bool)]
    return float(off.median()) if off.numel() else 1.0


def _mean_offdiag(m: torch.Tensor) -> float | None:
    n = len(m)
    if n < 2:
        return None
    return float(m[~torch.eye(n, dtype=torch.bool)].mean())


def posterior_report(cfg: PosteriorReportConfig, log=print) -> Path:
    """Write ``out/report.md``, ``out/report.json`` and the figures; returns the page's path."""
    cfg.check()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ref = Collection.open(cfg.reference)
    cols = {"reference": ref}
    for name, path in cfg.collections.items():
        c = Collection.open(path)
        if c.arch != ref.arch:
            raise ConfigError(f"collection {name!r} holds {c.arch}, the reference {ref.arch}")
        cols[name] = c
    paths = {"reference": cfg.reference, **cfg.collections}
    if len(ref) < 2:
        raise ConfigError("the reference needs at least 2 members")
    bundle = load_bundle(cfg.dataset, ood=None, test_size=max(cfg.probe, cfg.loss_images))
    x_test, y_test = bundle.test.float(), bundle.test.y
    probe, y_probe = x_test[: cfg.probe], y_test[: cfg.probe]
    ood = {k: v.float()[: cfg.probe] for k, v in bundle.ood.items()}

    log("canonical forms (scaling, then permutations)")
    canon = {n: canonical_collection(paths[n], out / "canonical" / n) for n in cols}

    log("weight and function vectors")
    vec = {
        "weight": {n: c.vectors() for n, c in cols.items()},
        "weight, canonical": {n: c.vectors() for n, c in canon.items()},
    }
    probs_in = {n: member_probs(c, probe) for n, c in cols.items()}
    vec["function"] = {n: p.reshape(len(p), -1) for n, p in probs_in.items()}
    bandwidth = {s: _median_distance(v["reference"]) for s, v in vec.items()}

    rows = []
    for name, col in cols.items():
        row = {"collection": name, "networks": len(col), "method": sorted(
            {m.method for m in col.members})}  # fmt: skip
        if name != "reference":
            for space, v in vec.items():
                a, b = v["reference"], v[name]
                ok = len(b) >= 2
                row[f"mmd2 {space}"] = mmd2(a, b, "gaussian", bandwidth[space]) if ok else None
                row[f"differs {space}"] = (
                    mmd_agg_test(a, b, alpha=cfg.alpha, seed=cfg.seed).reject if ok else None
                )
        pin = Predictive(probs_in[name].float())
        row["accuracy"] = accuracy(pin.mean(), y_probe)
        row["nll"] = nll(pin.mean(), y_probe)
        row["mi in"] = _mean_offdiag(pairwise_mutual_information(probs_in[name]))
        for k, xo in ood.items():
            po = member_probs(col, xo)
            row[f"mi {k}"] = _mean_offdiag(pairwise_mutual_information(po))
            row[f"auroc {k}"] = auroc(entropy_score(pin), entropy_score(Predictive(po.float())))
        rows.append(row)
        log(f"{name}: {json.dumps({k: v for k, v in row.items() if k != 'method'})}")

    log("barriers and modes (balanced, aligned by weight matching)")
    net = build_from(ref.arch).eval()
    xl, yl = x_test[: cfg.loss_images], y_test[: cfg.loss_images]
    bn_data = bundle.train.float()[:2000]
    for row in rows:
        col = cols[row["collection"]]
        ids = [m.id for m in col.members][: cfg.modes_members]
        if len(ids) < 2:
            row.update({"modes": None, "barrier median": None, "barrier max": None})
            continue
        # barriers are the expensive part: kept on disk, keyed by what they depend on
        key = hashlib.sha256(json.dumps([[(m.id, m.sha256) for m in col.members if m.id in ids],
                                         cfg.dataset, cfg.loss_images, cfg.path_points],
                                        ).encode()).hexdigest()[:16]  # fmt: skip
        cache = out / "barriers" / f"{row['collection']}-{key}.safetensors"
        if cache.is_file():
            B = io.load(cache, kind="barriers")["B"]
        else:
            B = barrier_matrix(net, [col.load(i) for i in ids], xl, yl, points=cfg.path_points,
                               bn_data=bn_data, example_input=example_input(ref.arch))  # fmt: skip
            cache.parent.mkdir(parents=True, exist_ok=True)
            io.save({"B": B}, cache, "barriers")
        off = B[~torch.eye(len(B), dtype=torch.bool)]
        n_modes, _ = count_modes(B, cfg.modes_threshold)
        row.update({"modes": n_modes, "modes of": len(ids), "barrier median": float(
            off.median()), "barrier max": float(off.max())})  # fmt: skip
        log(f"{row['collection']}: {n_modes} mode(s) among {len(ids)} networks, median barrier "
            f"{row['barrier median']:.3f}")  # fmt: skip

    # symmetry diagnostic on the reference: which unit of the first weight tensor holds its
    # largest entry (one tensor per network in memory, not whole collections)
    first_state = ref.load(ref.members[0].id)
    first_key = next(k for k, v in first_state.items() if v.dim() >= 2)
    units, per_unit = first_state[first_key].shape[0], first_state[first_key][0].numel()

    def first_weights(c: Collection) -> list[dict[str, torch.Tensor]]:
        return [{first_key: c.load(m.id)[first_key]} for m in ref.members]

    raw_idx = largest_weight_index(first_weights(ref), first_key)
    can_idx = largest_weight_index(first_weights(canon["reference"]), first_key)
    diag = {
        "tensor": first_key,
        "units": units,
        "p uniform (raw)": uniformity_pvalue(raw_idx // per_unit, units),
        "p uniform (canonical)": uniformity_pvalue(can_idx // per_unit, units),
    }

    log("figures")
    figs = out / "figures"
    panels = []
    for title, space in (("weights", "weight"), ("weights, symmetries removed",
                                                 "weight, canonical")):  # fmt: skip
        fit, others, ratio = pca(vec[space]["reference"],
                                 *[vec[space][n] for n in cols if n != "reference"])  # fmt: skip
        sets = {"reference": fit, **dict(zip([n for n in cols if n != "reference"], others))}
        panels.append((title, sets, ratio))
    figures.weight_pca_plot(panels, figs / "weights_pca.png")

    a, b, c = (ref.load(m.id) for m in ref.members[:3]) if len(ref) >= 3 else (None,) * 3
    curves = {}
    if a is not None:
        pspec, sspec = symmetry_specs(net, example_input(ref.arch), scaling="auto")
        if sspec is not None:
            a, b, c = (balance(s, sspec) for s in (a, b, c))
        b_al, c_al = align(a, b, pspec), align(a, c, pspec)
        kw = {"points": cfg.path_points, "bn_data": bn_data}
        curves["reference 0 -> 1, as trained"] = path_losses(net, a, b, xl, yl, **kw)
        curves["reference 0 -> 1, aligned"] = path_losses(net, a, b_al, xl, yl, **kw)
        figures.path_plot(curves, figs / "paths.png")
        plane = loss_plane(net, a, b_al, c_al, xl, yl, grid=cfg.plane_grid, bn_data=bn_data)
        figures.plane_plot(plane, ["ref 0", "ref 1 (aligned)", "ref 2 (aligned)"],
                           figs / "plane.png")  # fmt: skip

    result = {"config": asdict(cfg), "bandwidth": bandwidth, "rows": rows, "symmetry": diag,
              "paths": {k: {"t": v[0].tolist(), "loss": v[1].tolist(), "accuracy": v[2].tolist()}
                        for k, v in curves.items()}}  # fmt: skip
    io.atomic_write_text(out / "report.json", json.dumps(result, indent=1))
    page = out / "report.md"
    io.atomic_write_text(page, _markdown(cfg, ref, rows, diag, curves, list(ood)))
    return page


def _fmt(v, spec=".4f") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _markdown(cfg, ref, rows, diag, curves, ood_names) -> str:
    spaces = ("weight", "weight, canonical", "function")
    lines = [
        "# Posterior report",
        "",
        f"Reference: `{cfg.reference}` ({len(ref)} networks, {ref.arch.get('model')} on "
        f"{cfg.dataset}). Collections: "
        + (", ".join(f"`{k}` = `{v}`" for k, v in cfg.collections.items()) or "none") + ".",
        "",
        "## Distance to the reference",
        "",
        "MMD² (unbiased) with a Gaussian kernel whose bandwidth is the reference's median "
        "inter-network distance in each space, so that rows compare within a column; "
        f"'differs' = MMDAgg's aggregated test rejects at alpha {cfg.alpha}. Function space = "
        f"softmax outputs on {cfg.probe} test images. Canonical = minimum-norm scaling "
        "representative, then canonical permutation order.",
        "",
        "| collection | networks | " + " | ".join(f"MMD² {s}" for s in spaces)
        + " | differs (weight / canonical / function) |",
        "|---|---|" + "---|" * len(spaces) + "---|",
    ]  # fmt: skip
    for r in rows[1:]:
        diffs = " / ".join(_fmt(r.get(f"differs {s}")) for s in spaces)
        lines.append(f"| {r['collection']} | {r['networks']} | "
                     + " | ".join(_fmt(r.get(f"mmd2 {s}")) for s in spaces)
                     + f" | {diffs} |")  # fmt: skip
    lines += [
        "",
        "## Modes and diversity",
        "",
        f"Barriers: the largest excess of test NLL ({cfg.loss_images} images) along the linear "
        "path over the chord between the end points, after balancing both networks and "
        "aligning the second to the first by weight matching; modes = groups joined by "
        f"barriers below {cfg.modes_threshold} nats (single linkage), over the first "
        f"{cfg.modes_members} networks. Mutual information = mean pairwise Jensen-Shannon "
        "divergence of two networks' predictions (nats), in distribution and on each OOD set; acc, "
        "NLL and OOD AUROC (predictive entropy) of the collection's averaged prediction on the "
        "probe images.",
        "",
        "| collection | networks | modes | median barrier | max barrier | MI in | "
        + " | ".join(f"MI {k}" for k in ood_names) + " | acc % | NLL | "
        + " | ".join(f"AUROC {k} %" for k in ood_names) + " |",
        "|---|---|---|---|---|---|---|---|" + "---|" * (2 * len(ood_names)),
    ]  # fmt: skip
    for r in rows:
        modes = f"{r['modes']} of {r['modes of']}" if r.get("modes") is not None else "–"
        lines.append(f"| {r['collection']} | {r['networks']} | {modes} | "
                     f"{_fmt(r.get('barrier median'), '.3f')} | {_fmt(r.get('barrier max'), '.3f')}"
                     f" | {_fmt(r.get('mi in'))} | "
                     + " | ".join(_fmt(r.get(f"mi {k}")) for k in ood_names)
                     + f" | {100 * r['accuracy']:.2f} | {r['nll']:.4f} | "
                     + " | ".join(f"{100 * r[f'auroc {k}']:.1f}" for k in ood_names)
                     + " |")  # fmt: skip
    lines += [
        "",
        "## Symmetry diagnostic",
        "",
        f"Unit holding the largest weight of `{diag['tensor']}` across the reference's networks "
        f"({diag['units']} units): chi-square p-value against uniform "
        f"{diag['p uniform (raw)']:.3g} as trained, {diag['p uniform (canonical)']:.3g} in "
        "canonical form (uniform as trained is the permutation symmetry at work; canonical "
        "forms concentrate it).",
        "",
        "## Figures",
        "",
        "![weights](figures/weights_pca.png)",
        "",
        "Weights on the reference's two principal axes, as trained and with symmetries removed.",
    ]  # fmt: skip
    if curves:
        lines += ["", "![paths](figures/paths.png)", "",
                  "Test NLL and accuracy along the linear path between two reference networks, "
                  "as trained and after alignment.", "", "![plane](figures/plane.png)", "",
                  "Test NLL on the plane through three reference networks (the second and "
                  "third aligned to the first)."]  # fmt: skip
    return "\n".join(lines) + "\n"
