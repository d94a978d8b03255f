"""Prometheus remote-write receiver: decode (decode.py), land durably (landing.py), serve (server.py).

Compaction of landing segments into the raw day partitions lives in billing_dags.ingest.compaction.
"""
