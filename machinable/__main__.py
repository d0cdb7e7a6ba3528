"""``python -m machinable``: the same as the ``machinable`` command."""

import sys

from machinable.cli import main

sys.exit(main())
