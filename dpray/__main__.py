"""``python -m dpray`` is the ``dpray`` command."""

import sys

from dpray.cli import main

sys.exit(main())
