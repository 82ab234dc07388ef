"""Long-lived work between the web layer and storage: group-commit ingest, the in-memory
catalog, GitHub sync, retention, the statistics aggregator and Prometheus metrics."""
