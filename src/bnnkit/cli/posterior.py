"""``bnnkit posterior``: checkpoint collections, symmetries, MMD, modes and the report."""

from __future__ import annotations

from ..errors import ConfigError
from .common import Parser, add_quiet, count, positive_float, subset

NAME, HELP = "posterior", "checkpoint collections, symmetries, MMD"

#: flag names of the report that differ from their option's (kept from earlier releases)
REPORT_RENAME = {"modes_threshold": "threshold"}


def arguments(po) -> None:
    pa = po.add_subparsers(dest="action", required=True, parser_class=Parser)
    pa.add_parser("collect", help="train independent networks into a collection",
                  populate=_collect)  # fmt: skip
    pa.add_parser("canonicalize", help="remove scaling and permutation symmetries",
                  populate=_canonicalize)  # fmt: skip
    pa.add_parser("mmd", help="MMDAgg test between two collections", populate=_mmd)
    pa.add_parser("align", help="align every member to one by weight matching", populate=_align)
    pa.add_parser("modes", help="loss barriers between members and the modes they form",
                  populate=_modes)  # fmt: skip
    pa.add_parser("report", help="Markdown report with figures against a reference",
                  populate=_report)  # fmt: skip


def _collect(c) -> None:
    c.add_argument("--out", required=True, help="collection directory")
    c.add_argument("--model", default="mlp")
    c.add_argument("--dataset", default="fashion_mnist")
    c.add_argument("--members", type=count, default=128)
    c.add_argument("--epochs", type=count, default=5)
    c.add_argument("--subset", help="training examples ('all' for every one; default 16000)")
    c.add_argument("--chunk", type=count, default=32, help="networks trained at once")
    c.add_argument("--seed", type=int, default=0, help="seed of the first member / of draws")
    c.add_argument(
        "--from-run",
        metavar="RUN_DIR",
        help="instead: add a trained bnnkit model's posterior samples (plain nets)",
    )
    c.add_argument("--samples", type=count, default=1, help="draws per member (--from-run)")
    c.add_argument("--swag", action="store_true",
                   help="with --from-run: SWAG samples around the run's network")  # fmt: skip
    add_quiet(c)


def _canonicalize(k) -> None:
    k.add_argument("collection")
    k.add_argument("--out", required=True)
    k.add_argument("--no-scaling", action="store_true", help="remove permutations only")


def _mmd(mm) -> None:
    mm.add_argument("a")
    mm.add_argument("b")
    mm.add_argument("--space", choices=["weight", "function"], default="weight")
    mm.add_argument("--dataset", default="fashion_mnist", help="probe images (function space)")
    mm.add_argument("--probe", type=count, default=500, help="probe images (function space)")
    mm.add_argument("--alpha", type=float, default=0.05)
    mm.add_argument("--seed", type=int, default=0)


def _align(al) -> None:
    al.add_argument("collection")
    al.add_argument("--out", required=True)
    al.add_argument("--to", metavar="MEMBER_ID", help="target member (default: the first)")
    al.add_argument("--no-scaling", action="store_true", help="do not balance scalings first")


def _modes(md) -> None:
    md.add_argument("collection")
    md.add_argument("--members", type=count, default=16, help="first N members")
    md.add_argument("--threshold", type=positive_float, default=0.05,
                    help="a barrier below this (nats) joins two networks")  # fmt: skip
    md.add_argument("--dataset", default="fashion_mnist", help="test images for the losses")
    md.add_argument("--images", type=count, default=1000)
    md.add_argument("--no-align", action="store_true", help="barriers between weights as stored")


def _report(rp) -> None:
    from ..options import add_arguments
    from ..report.posterior import REPORT_OPTIONS

    add_arguments(rp, REPORT_OPTIONS, rename=REPORT_RENAME)
    rp.add_argument("--collection", action="append", metavar="NAME=DIR",
                    help="a collection to compare (repeatable)")  # fmt: skip
    add_quiet(rp)


def report_config(a):
    """The PosteriorReportConfig of a parsed ``bnnkit posterior report`` command line."""
    from ..options import given
    from ..report.posterior import REPORT_OPTIONS, PosteriorReportConfig

    named = {}
    for item in a.collection or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--collection takes NAME=DIR, got {item!r}")
        named[name] = path
    return PosteriorReportConfig(collections=named, **given(a, REPORT_OPTIONS))


def run(a) -> int:
    if a.action == "collect" and a.swag and not a.from_run:
        raise ConfigError("--swag needs --from-run RUN_DIR (a trained deterministic run)")
    if a.action == "collect" and a.from_run and a.swag:
        from ..posterior.collect import collect_swag

        col = collect_swag(a.out, a.from_run, samples=a.samples, seed=a.seed)
        print(f"{len(col)} members -> {a.out}")
    elif a.action == "collect" and a.from_run:
        from ..posterior.collect import collect_samples

        col = collect_samples(a.out, a.from_run, samples=a.samples, seed=a.seed)
        print(f"{len(col)} members -> {a.out}")
    elif a.action == "collect":
        from ..posterior.collect import collect_reference

        col = collect_reference(
            a.out, model=a.model, dataset=a.dataset, members=a.members, epochs=a.epochs,
            subset=subset(a.subset) if a.subset is not None else 16000, chunk=a.chunk,
            first_seed=a.seed,
            progress=None if a.quiet else (lambda k, n: print(f"{k}/{n} members", flush=True)),
        )  # fmt: skip
        print(f"{len(col)} members -> {a.out}")
    elif a.action == "canonicalize":
        from ..posterior.tools import canonical_collection

        col = canonical_collection(a.collection, a.out, scaling=not a.no_scaling)
        print(f"{len(col)} members in canonical form -> {a.out}")
    elif a.action == "mmd":
        _mmd_run(a)
    elif a.action == "align":
        from ..posterior.tools import aligned_collection

        col = aligned_collection(a.collection, a.out, to=a.to, scaling=not a.no_scaling)
        print(f"{len(col)} members aligned -> {a.out}")
    elif a.action == "modes":
        _modes_run(a)
    elif a.action == "report":
        from ..report.posterior import posterior_report

        page = posterior_report(report_config(a), log=(lambda *_: None) if a.quiet else print)
        print(f"report -> {page}")
    return 0


def _mmd_run(a) -> None:
    from ..posterior.tools import compare, example_input

    probe = None
    if a.space == "function":
        from ..data import load_bundle
        from ..posterior.collection import Collection

        arch = Collection.open(a.a).arch
        bundle = load_bundle(a.dataset, ood=[], test_size=a.probe)
        probe = bundle.test.float()
        if tuple(probe.shape[1:]) != tuple(example_input(arch).shape[1:]):
            raise ConfigError(f"{a.dataset} images do not fit the collection's input shape")
    r = compare(a.a, a.b, a.space, probe, alpha=a.alpha, seed=a.seed)
    best = min(r.p_values, key=r.p_values.get)
    print(f"MMDAgg ({a.space} space, alpha {r.alpha}): "
          f"{'different' if r.reject else 'no difference detected'}")  # fmt: skip
    print(f"most sensitive kernel: {best}, MMD^2 {r.statistics[best]:.4g}, "
          f"single-kernel p {r.p_values[best]:.4f}")  # fmt: skip


def _modes_run(a) -> None:
    import torch

    from ..data import load_bundle
    from ..posterior.collect import build_from
    from ..posterior.collection import Collection
    from ..posterior.modes import barrier_matrix, count_modes
    from ..posterior.tools import example_input

    col = Collection.open(a.collection)
    ids = [m.id for m in col.members][: a.members]
    if len(ids) < 2:
        raise ConfigError(f"{a.collection} holds {len(ids)} member(s); modes need at least 2")
    net = build_from(col.arch).eval()
    bundle = load_bundle(a.dataset, ood=[], test_size=a.images)
    x, y = bundle.test.float(), bundle.test.y
    if tuple(x.shape[1:]) != tuple(example_input(col.arch).shape[1:]):
        raise ConfigError(f"{a.dataset} images do not fit the collection's input shape")
    B = barrier_matrix(net, [col.load(i) for i in ids], x, y, aligned=not a.no_align,
                       bn_data=bundle.train.float()[:2000],
                       example_input=example_input(col.arch))  # fmt: skip
    n, labels = count_modes(B, a.threshold)
    off = B[~torch.eye(len(B), dtype=torch.bool)]
    print(f"{n} mode(s) among {len(ids)} networks (barrier < {a.threshold} nats joins two; "
          f"{'aligned' if not a.no_align else 'as trained'}); barriers: median "
          f"{float(off.median()):.4f}, max {float(off.max()):.4f}")  # fmt: skip
    for mode in range(n):
        print(f"mode {mode}: " + ", ".join(i for i, lab in zip(ids, labels) if lab == mode))
