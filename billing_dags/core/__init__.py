"""Core helpers every layer may use: settings, durable publishing and canonical JSON, DuckDB sessions, months and windows, the input-error base."""
