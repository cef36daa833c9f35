"""``python -m bnnkit.cli``: the ``bnnkit`` command."""

import sys

from . import main

sys.exit(main())
