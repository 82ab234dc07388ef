"""opa-telemetry server: an OPA-compatible version-check and anonymous telemetry service."""

from opa_telemetry import __version__

__all__ = ["__version__"]
