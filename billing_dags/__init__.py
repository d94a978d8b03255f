"""billing_dags: a Prometheus-native usage-billing warehouse (Dagster + DuckDB + Parquet)."""

__version__ = "0.1.0"
