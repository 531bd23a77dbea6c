"""``python -m segtorch``: the same as the ``segtorch`` command."""
import sys

from .cli import main

sys.exit(main())
