"""``python -m cio_logging``: the ``cio-logging`` command (how a handler starts its sender)."""

import sys

from .cli import main

sys.exit(main())
