"""``python -m cowdisk``: the same as the ``cowdisk`` script."""

import sys

from .cli import main

sys.exit(main())
