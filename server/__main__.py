"""``python -m opa_telemetry_server``."""

import sys

from .cli import main

sys.exit(main())
