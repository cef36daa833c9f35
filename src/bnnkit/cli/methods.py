"""``bnnkit methods``: the registered methods and their options."""

from __future__ import annotations

import json

NAME, HELP = "methods", "list the registered methods and their options"


def arguments(m) -> None:
    pass


def run(a) -> int:
    from ..methods import METHODS

    for m in METHODS.values():
        extra = f" (post hoc on {m.posthoc_of})" if m.posthoc_of else ""
        print(f"{m.name}: {m.summary}{extra}")
        for o in m.options:
            print(f"    {o.name}={json.dumps(o.default)}  {o.help} [{o.describe()}]")
    return 0
