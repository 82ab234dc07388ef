"""The PostgreSQL backend, for several server nodes on one database (needs ``asyncpg``).

``backend`` holds :class:`PostgresStorage` (pool, group commit by COPY, advisory locks,
password redaction); ``migrations`` the numbered schema steps.
"""

from __future__ import annotations

from opa_telemetry_server.storage.postgres.backend import PostgresStorage, redact_dsn

__all__ = ["PostgresStorage", "redact_dsn"]
