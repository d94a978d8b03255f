"""Compaction of landing segments into raw day partitions, its Dagster asset and sensor."""

from __future__ import annotations

import os
import struct
from datetime import date

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest
import remote_write_corpus as corpus

from billing_dags.ingest import compaction, raw
from billing_dags.ingest.compaction import compact, pending_days
from billing_dags.ingest.remote_write.customers import CustomerResolver
from billing_dags.ingest.remote_write.decode import STALE_NAN_BITS, Decoder
from billing_dags.ingest.remote_write.landing import SegmentWriter, sealed_segments

STALE = struct.unpack("<d", struct.pack("<Q", STALE_NAN_BITS))[0]
DAY = date(2026, 5, 28)
T0 = raw.day_bounds_ms(DAY)[0] + 3_600_000
LATE = T0 + raw.DAY_MS - 3_600_000 - 1000  # 23:59:59 of DAY


def land(paths, *requests, **writer_kw):
    """Write each request (a list of (labels, samples)) as it would arrive, then seal."""
    dec = Decoder(CustomerResolver.from_seeds(paths.seeds_dir))
    w = SegmentWriter(paths.landing, max_segment_age_s=3600, **writer_kw)
    for req in requests:
        w.submit(dec.decode(corpus.body(req))).result(5)
    w.close()


def S(client="miner-001", name="stratum_submits_total"):
    return {"__name__": name, "client_id": client, "job": "proxy"}


def sid(client="miner-001", name="stratum_submits_total"):
    return raw.series_id(name, {"client_id": client, "job": "proxy"})


def part(paths, day=DAY):
    p = raw.samples_day_dir(paths, day) / "part-remote_write.parquet"
    return pq.read_table(p) if p.exists() else None


def test_compaction_splits_by_utc_day_dedupes_and_removes_segments(paths):
    nxt = date(2026, 5, 29)
    land(
        paths,
        [(S(), [(T0, 1.0), (T0 + 1000, 2.0)])],
        [(S(), [(T0 + 1000, 2.0), (T0 + 2000, 3.0)]), (S("miner-002"), [(LATE, 7.0), (LATE + 2000, 8.0)])],  # resent + midnight
        [(S(), [(T0 - 5000 + 5000, 1.0)])],  # an out-of-order duplicate
    )
    assert list(pending_days(paths)) == [DAY.isoformat(), nxt.isoformat()]
    result = compact(paths)
    by_day = {r["day"]: r for r in result["days"]}
    assert by_day[DAY.isoformat()]["new_samples"] == 4 and by_day[DAY.isoformat()]["duplicates"] == 2
    assert by_day[nxt.isoformat()]["new_samples"] == 1
    t = part(paths)
    assert t["series_id"].to_pylist() == sorted(t["series_id"].to_pylist())
    rows = sorted(zip(t["series_id"].to_pylist(), t["ts"].to_pylist(), t["value"].to_pylist()))
    assert rows == sorted([(sid(), T0, 1.0), (sid(), T0 + 1000, 2.0), (sid(), T0 + 2000, 3.0), (sid("miner-002"), LATE, 7.0)])
    assert part(paths, nxt).num_rows == 1
    series = pq.read_table(raw.series_day_dir(paths, DAY) / "part-remote_write.parquet").to_pylist()
    assert {r["series_id"]: r["first_seen"] for r in series} == {sid(): T0, sid("miner-002"): LATE}
    assert sorted(dict(series[0]["labels"])) == ["client_id", "job"]
    # every day of the segment is in a partition: the segment is gone
    assert sealed_segments(paths.landing) == [] and pending_days(paths) == {}


def test_compaction_merges_with_the_day_and_is_idempotent(paths):
    land(paths, [(S(), [(T0, 1.0), (T0 + 1000, 2.0)])])
    compact(paths)
    f = raw.samples_day_dir(paths, DAY) / "part-remote_write.parquet"
    before = f.read_bytes()
    # a later batch: another value at a ts already there (both kept: the models bill the larger and
    # flag the conflict), one new sample, and one identical to a stored sample (stored once)
    land(paths, [(S(), [(T0 + 1000, 99.0), (T0 + 2000, 3.0), (T0, 1.0)])])
    r = compact(paths)["days"][0]
    assert (r["existing_samples"], r["new_samples"], r["duplicates"], r["samples"]) == (2, 2, 1, 4)
    assert part(paths)["value"].to_pylist() == [1.0, 2.0, 99.0, 3.0]
    # the same data again changes nothing and does not rewrite the day (no spurious late-data rerun)
    land(paths, [(S(), [(T0, 1.0), (T0 + 2000, 3.0)])])
    mtime = f.stat().st_mtime_ns
    r = compact(paths)["days"][0]
    assert r["new_samples"] == 0 and not r["written"] and f.stat().st_mtime_ns == mtime
    assert compact(paths)["days"] == []
    assert f.read_bytes() != before and part(paths).num_rows == 4


def test_staleness_markers_and_nan_stay_in_raw_and_are_counted(paths):
    land(paths, [(S(), [(T0, 1.0), (T0 + 1000, STALE), (T0 + 2000, float("nan"))])])
    r = compact(paths)["days"][0]
    assert (r["stale"], r["nonfinite"]) == (1, 1)
    vals = part(paths)["value"].to_numpy()
    assert vals.view(np.uint64)[1] == STALE_NAN_BITS and np.isnan(vals[2])


def test_unknown_customers_are_kept_and_reported(paths):
    land(paths, [(S("ghost-1"), [(T0, 1.0), (T0 + 1000, 2.0)]), (S(), [(T0, 1.0)])])
    r = compact(paths)["days"][0]
    assert part(paths).num_rows == 3 and r["new_samples"] == 3
    assert r["unknown_customer"] == 2 and r["unknown_customers"] == {"ghost-1": 2}


def test_segments_stay_when_the_partition_write_fails(paths, monkeypatch):
    land(paths, [(S(), [(T0, 1.0)])])

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compaction.raw, "write_day", boom)
    with pytest.raises(OSError, match="No space left on device"):
        compact(paths)
    assert len(sealed_segments(paths.landing)) == 1 and part(paths) is None
    monkeypatch.undo()
    compact(paths)
    assert part(paths).num_rows == 1 and sealed_segments(paths.landing) == []


def test_compaction_seals_segments_left_open_by_a_killed_receiver(paths):
    dec = Decoder()
    w = SegmentWriter(paths.landing, max_segment_age_s=3600)
    w.submit(dec.decode(corpus.body([(S(), [(T0, 1.0)])]))).result(5)
    fd = w._seg.fd
    w._seal_current = lambda: None
    w.close()
    os.close(fd)
    with open(next(paths.landing.glob("*.open")), "ab") as f:
        f.write(b"BRWR\xff\x00\x00")  # a torn record header
    result = compact(paths)
    assert len(result["recovered_segments"]) == 1
    assert part(paths).num_rows == 1 and not list(paths.landing.glob("seg-*"))


def test_a_segment_spanning_two_days_is_removed_after_both(paths):
    land(paths, [(S(), [(T0, 1.0), (T0 + raw.DAY_MS, 2.0)])])
    compact(paths, days=[DAY.isoformat()])
    [seg] = sealed_segments(paths.landing)
    assert seg.pending_days() == ["2026-05-29"]
    compact(paths, days=["2026-05-29"])
    assert sealed_segments(paths.landing) == []


# --- Dagster -------------------------------------------------------------------------------


def _res(paths):
    from billing_dags.defs.shared.resources import WarehouseResource

    return {"warehouse": WarehouseResource(data_dir=str(paths.data_dir), seeds_dir=str(paths.seeds_dir))}


def test_sensor_requests_exactly_the_days_in_new_segments(paths):
    from billing_dags.definitions import defs as load_defs

    land(paths, [(S(), [(T0, 1.0), (T0 + raw.DAY_MS + 5, 2.0)])], [(S(), [(T0 + 3 * raw.DAY_MS, 3.0)])])
    defs = load_defs()
    sensor = defs.resolve_sensor_def("remote_write_landing_sensor")
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance, definitions=defs, resources=_res(paths))
        result = sensor.evaluate_tick(ctx)
    reqs = result.run_requests
    assert sorted(r.partition_key for r in reqs) == ["2026-05-28", "2026-05-29", "2026-05-31"]
    assert all(r.tags["billing/reason"] == "remote-write landing data" for r in reqs)
    assert all(r.asset_selection == [dg.AssetKey("remote_write_samples")] for r in reqs)
    compact(paths, days=["2026-05-28"])
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance, definitions=defs, resources=_res(paths))
        keys = sorted(r.partition_key for r in sensor.evaluate_tick(ctx).run_requests)
    assert keys == ["2026-05-29", "2026-05-31"]


def test_sensor_waits_for_today_and_skips_when_nothing_is_pending(paths):
    from billing_dags.defs.ingest.compaction import landing_run_requests

    land(paths, [(S(), [(T0, 1.0)])])
    reqs, waiting = landing_run_requests(paths, today=DAY)
    assert reqs == [] and waiting == [DAY.isoformat()]
    reqs, waiting = landing_run_requests(paths, today=date(2026, 5, 29))
    assert [r.partition_key for r in reqs] == [DAY.isoformat()] and waiting == []
    compact(paths)
    assert landing_run_requests(paths) == ([], [])


def test_materialize_the_compaction_asset_for_one_day(paths):
    from billing_dags.defs.ingest.compaction import remote_write_samples
    from billing_dags.defs.shared.resources import WarehouseResource

    land(paths, [(S(), [(T0, 1.0), (T0 + 1000, 2.0), (T0 + raw.DAY_MS, 3.0)])])
    result = dg.materialize(
        [remote_write_samples],
        partition_key=DAY.isoformat(),
        resources={"warehouse": WarehouseResource(data_dir=str(paths.data_dir), seeds_dir=str(paths.seeds_dir))},
    )
    assert result.success
    [mat] = result.asset_materializations_for_node("remote_write_samples")
    assert mat.metadata["new_samples"].value == 2 and mat.metadata["rewritten"].value is True
    assert part(paths).num_rows == 2
    assert [s.pending_days() for s in sealed_segments(paths.landing)] == [["2026-05-29"]]
