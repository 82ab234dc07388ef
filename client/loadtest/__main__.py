"""``python -m opa_telemetry.loadtest``: the same as ``opa-telemetry-loadtest``."""

import sys

from .cli import main

sys.exit(main())
