"""``python -m tuner`` is ``btune``."""

import sys

from tuner.cli import main

sys.exit(main())
