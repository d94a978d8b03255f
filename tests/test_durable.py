"""Every file the project publishes is durable the same way: the temporary file is fsynced, renamed
over the destination, and the destination's folder is fsynced after the rename (DESIGN rule 10)."""

from __future__ import annotations

import ast
import os
import threading
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sql_helpers import SEEDS_DIR, ms, samples_table, series_table, usage_month_table

from billing_dags.core.settings import PROJECT_ROOT, Paths

DAY = date(2025, 1, 10)
JAN = date(2025, 1, 1)


class Recorder:
    """os.fsync / os.replace / os.rename calls, in order, by real path."""

    def __init__(self):
        self.events: list[tuple] = []
        self._lock = threading.Lock()

    def add(self, *event) -> None:
        with self._lock:
            self.events.append(event)

    def assert_durable(self, dest: Path) -> None:
        dest = os.path.realpath(dest)
        renames = [i for i, e in enumerate(self.events) if e[0] == "rename" and e[2] == dest]
        assert renames, f"{dest} was not published by a rename: {self.events}"
        i = renames[-1]
        tmp = self.events[i][1]
        assert ("fsync", tmp) in self.events[:i], f"{tmp} was not fsynced before it was renamed to {dest}"
        assert ("fsync", os.path.dirname(dest)) in self.events[i + 1 :], f"the folder of {dest} was not fsynced after the rename"


@pytest.fixture
def rec(monkeypatch) -> Recorder:
    r = Recorder()
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        r.add("fsync", os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        real_replace(src, dst, **kw)
        r.add("rename", os.path.realpath(src), os.path.realpath(dst))

    def rename(src, dst, **kw):
        real_rename(src, dst, **kw)
        r.add("rename", os.path.realpath(src), os.path.realpath(dst))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    return r


@pytest.fixture
def p(tmp_path) -> Paths:
    return Paths(tmp_path / "data", SEEDS_DIR)


# --- one setup and one publish per path ----------------------------------------------------------

INVOICE_LINES = [
    {
        "month": JAN,
        "customer_id": "acme",
        "plan_id": "pro",
        "plan_version": 1,
        "currency": "usd",
        "dimension": "",
        "line_number": 1,
        "line_type": "base_fee",
        "meter_id": None,
        "description": "Pro base fee",
        "quantity": Decimal(1),
        "unit": "month",
        "unit_price": Decimal("10"),
        "amount_minor": 1000,
    },
]


def _invoice_files(p: Paths):
    from billing_dags.billing.build import build_invoices
    from billing_dags.billing.store import write_invoice_files

    docs = build_invoices(
        INVOICE_LINES,
        [{"customer_id": "acme", "name": "Acme", "currency": "usd"}],
        [{"plan_id": "pro", "version": 1, "name": "Pro"}],
        [{"currency": "usd", "minor_unit_exponent": 2}],
        JAN,
        now=datetime(2025, 1, 20, tzinfo=UTC),
        manifest={},
        paths=p,
    )
    return lambda: [Path(f) for f in write_invoice_files(p, docs)["written"]]


def _registry(p: Paths):
    from billing_dags.billing.numbering import assign_invoice_numbers, registry_path

    return lambda: (assign_invoice_numbers(p, JAN, ["acme"]), [registry_path(p)])[1]


def _ledger(p: Paths):
    from billing_dags.billing.credits import write_ledger

    return lambda: [Path(write_ledger(p, [], {"usd": 2})["path"])]


def _flag_ack(p: Paths):
    from billing_dags.operations.flags import acknowledge, acks_path

    f = p.models / "fct_anomaly_flags_by_day" / f"day={DAY}" / "data.parquet"
    f.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"day": DAY, "customer_id": "acme", "meter_id": "proxy_bytes", "rule": "spike", "severity": "critical"}]), f)
    return lambda: (acknowledge(p, "acme", JAN, "spike", "", "ops", "checked"), [acks_path(p)])[1]


def _model_partition(p: Paths):
    from billing_dags.models.sqlmodels import Window, load_project, write_partition

    table = usage_month_table([{"month": JAN, "customer_id": "acme", "meter_id": "m", "kind": "counter", "period_ms": 1}])
    return lambda: [write_partition(p, load_project().models["fct_usage_by_month"], Window(JAN, date(2025, 2, 1)), table)]


def _raw_day(p: Paths):
    from billing_dags.ingest import raw

    sid = raw.series_id("stratum_bytes_sent_total", {"client_id": "miner-001"})
    samples = samples_table({sid: [(ms(DAY, 1), 1.0)]})
    series = series_table({sid: ("stratum_bytes_sent_total", {"client_id": "miner-001"}, ms(DAY, 1))})
    return lambda: (raw.write_day(p, DAY, samples, series, "sim"), [*raw.sample_files(p, DAY), *raw.series_files(p)])[1]


def _events_day(p: Paths):
    from billing_dags.ingest.events import EVENTS_SCHEMA, event_files, write_events_day

    table = pa.Table.from_pylist(
        [
            {
                "event_id": "e1",
                "ts": ms(DAY, 1),
                "customer_key": "k",
                "meter_id": "llm_input_tokens",
                "dimension": "",
                "kind": "delta",
                "quantity": Decimal(1),
                "hold_ms": 0,
                "attributes": [],
            }
        ],
        schema=EVENTS_SCHEMA,
    )
    return lambda: (write_events_day(p, DAY, table, "postgres"), event_files(p, DAY))[1]


def _outbox(p: Paths):
    from billing_dags.stripe.outbox import write_outbox

    return lambda: [write_outbox(p, DAY, [])]


def _seed_snapshot(p: Paths):
    from billing_dags.defs.seeds.assets import write_seed_snapshots

    return lambda: [write_seed_snapshots(p, {"currencies"})["currencies"]["path"]]


def _daily_summary(p: Paths):
    from billing_dags.operations.reports import DailySummary, write_daily_summary

    s = DailySummary(DAY, 0, Decimal(0), Decimal(0), Decimal(0), Decimal(0), [], [], [], [])
    return lambda: write_daily_summary(p, s)


def _metrics_textfile(p: Paths):
    from billing_dags.operations.metrics_export import export_metrics

    out = p.data_dir / "metrics" / "billing.prom"
    return lambda: (export_metrics(p, output=out, today=DAY), [out])[1]


def _recording_rules(p: Paths, monkeypatch):
    from billing_dags.cli import metrics

    out = p.data_dir / "rules" / "billing_recording_rules.yml"
    monkeypatch.setattr(metrics, "RULES_FILE", out)
    return lambda: (metrics.main(["--write-rules", "--seeds-dir", str(SEEDS_DIR)]), [out])[1]


def _warehouse(p: Paths):
    from billing_dags.operations.warehouse import refresh_views

    return lambda: [Path(refresh_views(p)["path"])]


def _landing_seal(p: Paths):
    from billing_dags.ingest.remote_write.landing import INDEX_SUFFIX, OPEN_SUFFIX, seal

    folder = p.data_dir / "landing"
    folder.mkdir(parents=True)
    (folder / f"seg-1{OPEN_SUFFIX}").write_bytes(b"data")
    return lambda: [seal(folder, folder / f"seg-1{OPEN_SUFFIX}", {"records": 1}), folder / f"seg-1{INDEX_SUFFIX}"]


def _dispute_evidence(p: Paths):
    from billing_dags.operations.disputes import Dispute, export_evidence

    evidence = pa.Table.from_pylist([{"series_id": 1, "ts_ms": ms(DAY, 1), "value": 1.0, "increase": Decimal(1)}])
    row = {"meter_id": "proxy_bytes", "series_id": 1, "ts": ms(DAY, 1), "event": "reset", "prev_value": 2.0, "value": 1.0, "gap_ms": 0}
    dispute = Dispute(
        "acme", JAN, "", "day", [{"meter_id": "proxy_bytes", "increase": Decimal(1)}], [], [row], None, [], tie_out={"meters": {}}, evidence=evidence
    )
    return lambda: export_evidence(dispute, p.data_dir / "disputes" / "acme")


PUBLISH_PATHS = {
    "invoice files": _invoice_files,
    "invoice number registry": _registry,
    "credits ledger": _ledger,
    "flag acknowledgements": _flag_ack,
    "model partition": _model_partition,
    "raw samples and series": _raw_day,
    "raw events": _events_day,
    "stripe outbox": _outbox,
    "seed snapshot": _seed_snapshot,
    "daily summary": _daily_summary,
    "metrics textfile": _metrics_textfile,
    "recording rules": _recording_rules,
    "warehouse views": _warehouse,
    "landing segment and index": _landing_seal,
    "dispute evidence pack": _dispute_evidence,
}


@pytest.mark.parametrize("name", sorted(PUBLISH_PATHS))
def test_every_publish_fsyncs_the_file_renames_then_fsyncs_the_folder(name, p, rec, monkeypatch):
    setup = PUBLISH_PATHS[name]
    action = setup(p, monkeypatch) if name == "recording rules" else setup(p)
    rec.events.clear()
    published = action()
    assert published
    for dest in published:
        rec.assert_durable(Path(dest))
    assert not list(p.data_dir.rglob(".*tmp*")), "temporary files left behind"


def test_only_the_durable_module_renames_files():
    """No module but billing_dags/core/durable.py renames a file into place (os.replace, os.rename, Path.rename/replace)."""
    offenders = []
    for f in sorted((PROJECT_ROOT / "billing_dags").rglob("*.py")):
        if f.name == "durable.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("replace", "rename"):
                target = node.func.value
                path_replace = node.func.attr == "replace" and len(node.args) == 1 and not node.keywords  # Path.replace(target)
                if (isinstance(target, ast.Name) and target.id == "os") or node.func.attr == "rename" or path_replace:
                    offenders.append(f"{f.relative_to(PROJECT_ROOT)}:{node.lineno}")
    assert offenders == []


#: modules that write files in place on purpose: the receiver's landing log (appended and fsynced
#: record by record; a segment is published by sealing it through durable.publish); lock files are
#: held through durable.exclusive_lock
WRITES_IN_PLACE = {
    "ingest/remote_write/landing.py": "the append-only landing segment",
}


def test_only_the_durable_module_writes_files_in_place():
    """Files are written under a temporary name that durable publishes: no module writes a destination
    directly (Path.write_text/write_bytes, open(..., "w"/"a"/"x"), shutil.copy/move), but the listed ones."""
    offenders = []
    for f in sorted((PROJECT_ROOT / "billing_dags").rglob("*.py")):
        rel = f.relative_to(PROJECT_ROOT / "billing_dags").as_posix()
        if rel == "core/durable.py" or rel in WRITES_IN_PLACE:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if (
                name in ("write_text", "write_bytes")
                and isinstance(func, ast.Attribute)
                and not (isinstance(func.value, ast.Name) and func.value.id in ("durable", "batch"))
            ):
                offenders.append(f"{rel}:{node.lineno} {name}")
            elif name in ("copy", "copy2", "copyfile", "move") and isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "shutil":
                offenders.append(f"{rel}:{node.lineno} shutil.{name}")
            elif name == "open" and (isinstance(func, ast.Name) or getattr(func.value, "id", "") != "os"):
                modes = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
                modes += [k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)]
                if any(c in m for m in modes for c in "wax"):
                    offenders.append(f"{rel}:{node.lineno} open({modes[0]!r})")
    assert offenders == []


def test_a_failed_write_inside_staged_publishes_nothing(tmp_path):
    from billing_dags.core import durable

    dest = tmp_path / "out" / "file.json"
    durable.write_bytes(dest, b"old\n")
    with pytest.raises(ValueError, match="validation failed"), durable.staged(dest) as tmp:  # noqa: PT012 (the failure is inside the block)
        tmp.write_bytes(b"half")
        raise ValueError("validation failed")
    assert dest.read_bytes() == b"old\n" and sorted(os.listdir(dest.parent)) == ["file.json"]
