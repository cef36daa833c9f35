"""``bnnkit data``: where the data sets are, their sizes and sha256 checks."""

from __future__ import annotations

NAME, HELP = "data", "list data sets, where they are, counts, sha256 checks"


def arguments(d) -> None:
    d.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="data sets to check (default: all, and fail only if the default one, "
        "fashion_mnist, is missing or a file present fails its sha256 check)",
    )
    d.add_argument("--no-verify", action="store_true", help="skip the sha256 check of files")
    d.add_argument("--download", metavar="NAME", help="download a data set (needs internet)")


def run(a) -> int:
    """List data sets, where they are, their sizes and checksums. Exits non-zero, naming the fix,
    when a named data set (or, with no names, the default one) is missing, or when any file
    that is present fails its sha256 check."""
    from ..data import DATASETS, fetch, get_spec, locate_split, verify
    from ..data.sources import DEFAULT_DATASET, count
    from ..errors import DataError

    for name in [*a.names, *([a.download] if a.download else [])]:
        get_spec(name)  # an unknown name is refused before anything is downloaded
    requested = list(dict.fromkeys([*a.names, *([a.download] if a.download else [])]))
    if a.download:
        got = fetch(a.download)
        print(f"downloaded {len(got)} file(s) for {a.download}" if got else "already present")
    required = set(requested) if requested else {DEFAULT_DATASET}
    problems = []
    for name in requested or list(DATASETS):
        spec = get_spec(name)
        counts, folders, missing, unreadable = [], set(), False, None
        for split in spec.files:
            try:
                folders.update(str(p.parent) for p in locate_split(name, split))
            except DataError:
                missing = True
                continue
            try:
                counts.append(f"{split} {count(name, split):,}")
            except DataError as e:
                unreadable = str(e).splitlines()[0]
        state = "MISSING" if missing else "UNREADABLE" if unreadable else ", ".join(counts)
        print(f"{name:<14} {spec.input_shape}  {spec.num_classes} classes  {state}")
        if folders:
            print(f"    found in {', '.join(sorted(folders))}")
        if missing:
            print(f"    to get it: {spec.hint}")
            if name in required:
                problems.append(f"{name} is missing; to get it: {spec.hint}")
        if unreadable:
            print(f"    {unreadable}")
        rows = verify(name) if not a.no_verify or missing else []
        for fname, where, status in rows:
            print(f"    {fname:<36} {status:<12} {where}")
        bad = [(fname, where) for fname, where, status in rows if status.startswith("MISMATCH")]
        for fname, where in bad:
            fix = (f"delete it and run `bnnkit data --download {name}`"
                   if any(f.url for fs in spec.files.values() for f in fs if f.name == fname)
                   else f"replace it with the original file ({spec.hint})")  # fmt: skip
            problems.append(f"{name}: {where} does not match its recorded sha256; {fix}")
        if unreadable and not bad:
            problems.append(f"{name}: {unreadable}")
    if problems:
        raise DataError("; ".join(problems))
    return 0
