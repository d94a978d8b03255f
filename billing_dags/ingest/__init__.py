"""Ingest: each usage source (Prometheus, remote write, PostgreSQL events, usage reports, simulation) lands raw day partitions."""
