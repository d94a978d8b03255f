"""Build remote-write request bodies the way Prometheus does (tests and benchmarks).

Each series' labels are sorted by name (``__name__`` included), samples ascend in time, and the
serialized WriteRequest is snappy-compressed in block format.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import cramjam

from billing_dags.ingest.remote_write.proto import TimeSeries, WriteRequest

Series = tuple[dict[str, str], Sequence[tuple[int, float]]]  # labels incl. __name__, [(ts_ms, value)]


def write_request(series: Iterable[Series], metadata: Iterable[tuple[str, int, str]] = (), sort_labels: bool = True):
    req = WriteRequest()
    for labels, samples in series:
        ts = req.timeseries.add()
        items = sorted(labels.items()) if sort_labels else list(labels.items())
        for k, v in items:
            ts.labels.add(name=k, value=v)
        for t, v in samples:
            ts.samples.add(timestamp=t, value=v)
    for name, mtype, help_text in metadata:
        req.metadata.add(metric_family_name=name, type=mtype, help=help_text)
    return req


def compress(payload: bytes) -> bytes:
    return bytes(cramjam.snappy.compress_raw(payload))


def body(series: Iterable[Series], metadata: Iterable[tuple[str, int, str]] = (), sort_labels: bool = True) -> bytes:
    return compress(write_request(series, metadata, sort_labels).SerializeToString())


def realistic_series(n_series: int, seed: int = 7) -> list[dict[str, str]]:
    """Label sets shaped like the five set-ups: counters per customer, job/instance labels."""
    rng = random.Random(seed)
    shapes = [
        ("stratum_bytes_sent_total", "client_id", "miner"),
        ("stratum_accepted_shares_total", "client_id", "miner"),
        ("iot_messages_total", "tenant", "tenant"),
        ("llm_tokens_total", "api_key_hash", "key"),
        ("container_cpu_usage_seconds_total", "namespace", "ns"),
        ("agent_runs_total", "team", "team"),
    ]
    out = []
    for i in range(n_series):
        metric, label, prefix = shapes[i % len(shapes)]
        out.append(
            {
                "__name__": metric,
                label: f"{prefix}-{i // len(shapes):04d}",
                "instance": f"10.0.{rng.randrange(256)}.{rng.randrange(256)}:9100",
                "job": metric.split("_")[0],
                "region": rng.choice(["eu-west-1", "us-east-1", "ap-south-1"]),
                "env": "prod",
            }
        )
    return out


def request_stream(n_series: int, samples_per_request: int, n_requests: int, start_ms: int, interval_ms: int = 15_000, seed: int = 7):
    """Bodies as Prometheus's queue manager sends them: one sample per series per scrape,
    ``samples_per_request`` samples per request, counters increasing."""
    rng = random.Random(seed)
    labels = realistic_series(n_series, seed)
    templates = []
    for lab in labels:  # each series' labels encoded once; requests copy them (C-level MergeFrom)
        t = TimeSeries()
        for k, v in sorted(lab.items()):
            t.labels.add(name=k, value=v)
        templates.append(t)
    values = [float(rng.randrange(1_000_000)) for _ in labels]
    bodies = []
    cursor = 0
    scrape = 0
    for _ in range(n_requests):
        req = WriteRequest()
        for _ in range(samples_per_request):
            i = cursor % n_series
            if i == 0 and cursor:
                scrape += 1
            values[i] += rng.randrange(0, 5000)
            ts = req.timeseries.add()
            ts.MergeFrom(templates[i])
            ts.samples.add(timestamp=start_ms + scrape * interval_ms + (i % 1000), value=values[i])
            cursor += 1
        bodies.append(compress(req.SerializeToString()))
    return bodies
