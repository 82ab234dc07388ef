"""opa-telemetry client: report a product's version in the background, never blocking startup.

Importing this package is cheap (a few milliseconds over ``asyncio`` and ``logging``): it needs
nothing outside the standard library, and no module that ``asyncio`` does not load already but
``json``. Nothing is imported later, when reports go out.
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
