"""``python -m opa_telemetry_server``."""

import sys

from opa_telemetry_server.cli import main

sys.exit(main())
