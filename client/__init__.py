"""opa-telemetry client: report a product's version in the background, never blocking startup.

Importing this package is cheap: aiohttp is imported in a worker thread when the first report
goes out, not here.
"""

from .answer import LatestRelease
from .errors import (
    AnswerError,
    RequestTimeoutError,
    ServiceError,
    TelemetryError,
    TransportError,
)
from .payload import Payload
from .reporter import Reporter, Schedule, check_latest

__version__ = "0.1.0"

__all__ = [
    "AnswerError",
    "LatestRelease",
    "Payload",
    "Reporter",
    "RequestTimeoutError",
    "Schedule",
    "ServiceError",
    "TelemetryError",
    "TransportError",
    "__version__",
    "check_latest",
]
