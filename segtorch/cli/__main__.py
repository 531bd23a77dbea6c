"""``python -m segtorch.cli`` (``torchrun ... -m segtorch.cli train ...``): the ``segtorch`` command."""
import sys

from . import main

sys.exit(main())
