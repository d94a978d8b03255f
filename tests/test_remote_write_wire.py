"""The compiled remote-write reader (wire.py) against the protobuf runtime (the reference).

Every body decodes to the same batch either way — series ids, timestamps, the values' exact bits,
staleness/non-finite/unknown-customer figures by day — or is refused either way with the same
error. The compiled reader leaves unusual shapes to the protobuf runtime; these tests check that
it does (it returns None) and that the result is still the reference's.
"""

from __future__ import annotations

import math
import random
import struct

import numpy as np
import pytest
import remote_write_corpus as corpus

from billing_dags.ingest.remote_write import wire
from billing_dags.ingest.remote_write.customers import CustomerResolver
from billing_dags.ingest.remote_write.decode import STALE_NAN_BITS, BadRequest, Decoder, Limits, OutOfWindow, TooLarge
from billing_dags.ingest.remote_write.proto import WriteRequest

T0 = 1_780_000_000_000
STALE = struct.unpack("<d", struct.pack("<Q", STALE_NAN_BITS))[0]


def outcome(decoder: Decoder, body: bytes):
    """What a decoder makes of a body: the batch's content, or the error it raises."""
    try:
        b = decoder.decode(body)
    except (BadRequest, TooLarge) as e:
        return (type(e).__name__, str(e))
    return {
        "series_id": b.series_id.tolist(),
        "ts": b.ts.tolist(),
        "value_bits": b.value.view(np.uint64).tolist(),
        "series": {sid: (i.metric, i.labels, i.customer, i.customer_label) for sid, i in b.series.items()},
        "figures": (b.samples, b.stale, b.nonfinite, b.unknown_customer, b.metadata, b.exemplars, b.histograms),
        "unknown_customers": dict(b.unknown_customers),
        "days": b.days,
    }


def both(body: bytes, resolver: CustomerResolver | None = None):
    fast = outcome(Decoder(resolver), body)
    reference = outcome(Decoder(resolver, compiled=False), body)
    return fast, reference


def payload(body: bytes) -> bytes:
    import cramjam

    return bytes(cramjam.snappy.decompress_raw(body))


def test_the_usual_request_is_read_by_the_compiled_reader_and_equals_the_reference(small_seeds):
    labels = corpus.realistic_series(300, seed=3)
    labels += [{"__name__": "stratum_submits_total", "job": "proxy", "client_id": "miner-001"}]
    series = []
    for i, lab in enumerate(labels):
        samples = [(T0 + 15_000 * k + i, float(i * 1000 + k)) for k in range(1 + i % 3)]
        series.append((lab, samples))
    body = corpus.body(series)
    assert wire.parse(payload(body)) is not None  # not a fallback
    fast, reference = both(body, CustomerResolver.from_seeds(small_seeds))
    assert fast == reference
    assert fast["figures"][0] == sum(1 + i % 3 for i in range(len(labels)))
    assert fast["unknown_customers"] and any(s[2] != "unknown" for s in fast["series"].values())


@pytest.mark.parametrize(
    "value",
    [0.0, -0.0, 1e-320, -1.5, 2.0**63, math.inf, -math.inf, math.nan, STALE, 1.7976931348623157e308],
)
@pytest.mark.parametrize("ts", [T0, 0, -1, -(2**62), 2**62, T0 + 86_399_999])
def test_values_keep_their_exact_bits_and_timestamps_their_sign(value, ts):
    body = corpus.body([({"__name__": "up", "job": "a"}, [(ts, value)])])
    parsed = wire.parse(payload(body))
    assert parsed is not None
    assert parsed.ts.tolist() == [ts]
    assert parsed.value.view(np.uint64).tolist() == [struct.unpack("<Q", struct.pack("<d", value))[0]]
    fast, reference = both(body)
    assert fast == reference
    assert isinstance(fast, tuple) == (ts < Limits().min_sample_ms or ts > 2**61)  # refused outside the window, alike


NOW_S = T0 / 1000 + 3600  # the receiver's clock in these tests


@pytest.mark.parametrize("fallback", [False, True], ids=["compiled", "protobuf"])
@pytest.mark.parametrize(
    "bad_ts",
    [253_402_300_800_000, -62_135_596_800_001, 2**63 - 1, -(2**63), -1, 0, 946_684_799_999, T0 + 3_600_000 + 600_001],
    ids=["year-10000", "before-year-1", "int64-max", "int64-min", "before-1970", "1970", "before-2000", "11-min-ahead"],
)
def test_samples_outside_the_window_are_refused_alike_by_both_readers(bad_ts, fallback):
    series = [
        ({"__name__": "up", "job": "a"}, [(T0, 1.0)]),
        ({"__name__": "node_load1", "job": "a"}, [(T0, 1.0), (bad_ts, 2.0), (bad_ts, 3.0)]),
    ]
    data = corpus.write_request(series, metadata=[("up", 1, "x")] if fallback else []).SerializeToString()
    lo, hi = Limits().window(int(NOW_S * 1000))
    parsed = wire.parse(data, lo, hi)
    if fallback:
        assert parsed is None
    else:  # counted in the compiled loop itself
        assert (parsed.out_of_window, parsed.first_out_of_window) == (2, (1, bad_ts))
    outcomes = []
    for compiled in (True, False):
        with pytest.raises(OutOfWindow) as e:
            Decoder(compiled=compiled, clock=lambda: NOW_S).decode(corpus.compress(data))
        assert e.value.samples == 2
        outcomes.append(str(e.value))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0].startswith(f"series 1 (node_load1): sample timestamp {bad_ts} ms") and "--max-sample-future" in outcomes[0]


@pytest.mark.parametrize("compiled", [True, False])
def test_the_window_edges_are_accepted(compiled):
    edges = [Limits().min_sample_ms, T0 + 3_600_000 + 600_000]  # 2000-01-01T00:00Z; exactly 10 minutes ahead
    body = corpus.body([({"__name__": "up", "job": "a"}, [(t, 1.0) for t in edges])])
    assert Decoder(compiled=compiled, clock=lambda: NOW_S).decode(body).ts.tolist() == edges


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (
            {"__name__": "up", "a": "1", "b": "2", "c": "3", "d": "4"},
            "series 0: 5 labels, over the limit of 4 (--max-labels); drop some with write_relabel_configs",
        ),
        ({"__name__": "up", "x" * 17: "1"}, "series 0: label name 'xxxxxxxxxxxxxxxxx' is 17 bytes, over the limit of 16 (--max-label-name-bytes)"),
        ({"__name__": "up", "a": "é" * 17}, "series 0: the value of label 'a' is 34 bytes, over the limit of 32 (--max-label-value-bytes)"),
        ({"__name__": "u" * 33}, "series 0: the value of label '__name__' is 33 bytes, over the limit of 32 (--max-label-value-bytes)"),
    ],
    ids=["count", "name", "value-bytes-not-characters", "metric-name"],
)
def test_label_limits_are_enforced_alike_by_both_readers(labels, message):
    limits = Limits(max_labels=4, max_label_name_bytes=16, max_label_value_bytes=32)
    body = corpus.body([(labels, [(T0, 1.0)])])
    fast = outcome(Decoder(limits=limits), body)
    assert fast == outcome(Decoder(compiled=False, limits=limits), body) == ("BadRequest", message)
    at_limit = {"__name__": "u" * 32, "n" * 16: "é" * 16, "b": "", "c": ""}  # 4 labels, 16-byte name, 32-byte values
    assert outcome(Decoder(limits=limits), corpus.body([(at_limit, [(T0, 1.0)])]))["figures"][0] == 1


def test_a_request_spanning_two_days_is_counted_per_day():
    body = corpus.body([({"__name__": "up", "job": "a"}, [(T0 - T0 % 86_400_000 - 1, 1.0), (T0 - T0 % 86_400_000, STALE)])])
    fast, reference = both(body)
    assert fast == reference and len(fast["days"]) == 2


def _with_exemplar() -> bytes:
    req = corpus.write_request([({"__name__": "up", "job": "a"}, [(T0, 1.0)])])
    ex = req.timeseries[0].exemplars.add(value=1.0, timestamp=T0)
    ex.labels.add(name="trace_id", value="abc")
    return req.SerializeToString()


def _labels_after_samples() -> bytes:
    # the same series with its samples field first: valid protobuf, not the order Prometheus writes
    req = WriteRequest()
    ts = req.timeseries.add()
    ts.samples.add(timestamp=T0, value=2.0)
    one = ts.SerializeToString()
    lab = WriteRequest()
    t2 = lab.timeseries.add()
    t2.labels.add(name="__name__", value="up")
    t2.labels.add(name="job", value="a")
    return b"\x0a" + bytes([len(one) + len(t2.SerializeToString())]) + one + t2.SerializeToString()


def _unknown_fields() -> bytes:
    # a field number the reader does not know, in the series and in the sample (newer senders)
    labels_only = corpus.write_request([({"__name__": "up", "job": "a"}, [])]).timeseries[0].SerializeToString()
    sample = corpus.write_request([({"__name__": "up"}, [(T0, 3.0)])]).timeseries[0].samples[0].SerializeToString()
    sample += b"\x18\x07"  # field 3, varint 7
    series = labels_only + b"\x12" + bytes([len(sample)]) + sample + b"\x2a\x02hi"  # field 5, bytes
    return b"\x0a" + bytes([len(series)]) + series


@pytest.mark.parametrize(
    ("make", "compiled"),
    [
        (lambda: corpus.write_request([], metadata=[("up", 2, "ok")]).SerializeToString(), False),
        (lambda: corpus.write_request([({"__name__": "up", "job": "a"}, [(T0, 1.0)])], metadata=[("up", 2, "ok")]).SerializeToString(), False),
        (_with_exemplar, False),
        (_labels_after_samples, False),
        (_unknown_fields, True),
        (lambda: b"", True),
        (lambda: corpus.write_request([({"__name__": "up", "job": "a"}, [])]).SerializeToString(), True),
    ],
    ids=["metadata-only", "samples-and-metadata", "exemplar", "labels-after-samples", "unknown-fields", "empty", "series-without-samples"],
)
def test_other_shapes_fall_back_or_skip_like_the_protobuf_runtime(make, compiled):
    data = make()
    assert (wire.parse(data) is not None) == compiled
    fast, reference = both(corpus.compress(data))
    assert fast == reference
    assert not isinstance(fast, tuple), fast


def _mutations(data: bytes, rng: random.Random, n: int):
    for _ in range(n):
        b = bytearray(data)
        kind = rng.randrange(4)
        if kind == 0:  # truncate
            b = b[: rng.randrange(len(b))]
        elif kind == 1:  # flip bytes
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif kind == 2:  # insert bytes
            i = rng.randrange(len(b))
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4)))
        else:  # delete a few bytes
            i = rng.randrange(len(b))
            del b[i : i + rng.randrange(1, 4)]
        yield bytes(b)


def test_fuzzed_bodies_get_the_same_answer_from_both_readers(small_seeds):
    resolver = CustomerResolver.from_seeds(small_seeds)
    rng = random.Random(20261122)
    series = [({"__name__": "stratum_submits_total", "job": "proxy", "client_id": f"miner-00{i}"}, [(T0 + k, float(k)) for k in range(2)]) for i in range(1, 6)]
    plain = corpus.write_request(series).SerializeToString()
    seen = {"fast": 0, "fallback": 0, "refused": 0}
    for data in (plain, plain + _with_exemplar(), plain + _unknown_fields(), plain + _labels_after_samples()):
        for mutated in _mutations(data, rng, 1500):
            body = corpus.compress(mutated)
            fast, reference = both(body, resolver)
            assert fast == reference, mutated.hex()
            seen["refused" if isinstance(fast, tuple) else "fast" if wire.parse(mutated) is not None else "fallback"] += 1
    # the fuzzing reached every path: read by the compiled reader, left to the runtime, refused
    assert min(seen.values()) > 50, seen
