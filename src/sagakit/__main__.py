"""``python -m sagakit``: the ``sagakit`` command."""

import sys

from .cli import main

sys.exit(main())
