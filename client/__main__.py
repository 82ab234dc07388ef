"""``python -m opa_telemetry``."""

import sys

from .cli import main

sys.exit(main())
