"""``python -m streamdit_core`` — see :mod:`streamdit_core.cli`."""

import sys

from .cli import main

sys.exit(main())
