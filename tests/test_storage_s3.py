"""The warehouse at an S3 URL (BILLING_DATA_URL): moto's standalone S3 server on 127.0.0.1 (its own process); a
finalized invoice object is never overwritten by a writer that did not read it; a publish is one atomic object
(a reader sees the old bytes or the new, a failed write leaves the old); bad settings exit 2 naming the variable
and the fix. Runs on an empty bucket give objects byte-identical to the files of the same runs on a local folder:
tests/test_celery_executor.py (days sharded 8 ways and their month, on Celery workers, each with a working copy
of its own)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from servers import S3_CREDENTIALS, free_port, moto_s3_server

from billing_dags.core import durable, storage
from billing_dags.core.settings import PROJECT_ROOT

boto3 = pytest.importorskip("boto3")

CREDENTIALS = S3_CREDENTIALS
_BUCKETS = itertools.count()


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server as its own process on 127.0.0.1, port 0 (read back from its startup line)."""
    with moto_s3_server() as url:
        yield url


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """A new bucket of its own and the environment pointing at it; yields (url of the warehouse, client)."""
    for k, v in {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket = f"wh-{os.getpid()}-{next(_BUCKETS)}"
    client.create_bucket(Bucket=bucket)
    yield f"s3://{bucket}/billing", client, bucket
    storage.detach_all()


def objects(client, bucket: str, prefix: str = "billing/") -> dict[str, bytes]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", ()):
            out[obj["Key"][len(prefix) :]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def cli_env(tmp_path: Path, name: str, seeds: Path, **extra) -> dict:
    home = tmp_path / f"dagster_{name}"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "AWS_", "STRIPE_", "PROMETHEUS_"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]),
        DAGSTER_HOME=str(home),
        BILLING_SEEDS_DIR=str(seeds),
        BILLING_DATA_DIR=str(tmp_path / name),
        **extra,
    )
    return env


BILLING = [sys.executable, "-m", "billing_dags.cli.main"]


# --------------------------------------------------------------------------- immutability and atomicity


def _copy(url: str, root: Path) -> storage.WorkingCopy:
    wc = storage.attach(url, root)
    wc.pull()
    return wc


def test_a_finalized_invoice_object_is_never_overwritten_by_a_writer_that_did_not_read_it(s3, tmp_path):
    url, client, bucket = s3
    key = "invoices/2026-02/mp-001.json"
    a, b = _copy(url, tmp_path / "a"), _copy(url, tmp_path / "b")  # two machines, both before the invoice exists
    finalized = b'{"status": "finalized", "total_minor": 100}\n'
    durable.write_bytes(a.root / key, finalized)
    assert objects(client, bucket)[key] == finalized
    # b never saw it: its put (If-None-Match: *) is refused, and neither the object nor b's copy changes
    with pytest.raises(storage.ConcurrentWriteError, match="changed by another writer"):
        durable.write_bytes(b.root / key, b'{"status": "finalized", "total_minor": 999}\n')
    assert objects(client, bucket)[key] == finalized and not (b.root / key).exists()
    # once b has read it, b decides with the finalized invoice in front of it (billing.store keeps it)
    b.pull()
    assert (b.root / key).read_bytes() == finalized
    # a writer whose copy went stale after reading (If-Match the ETag it read) is refused as well
    durable.write_bytes(a.root / key, finalized.replace(b"100", b"101"))
    with pytest.raises(storage.ConcurrentWriteError):
        durable.write_bytes(b.root / key, b'{"status": "finalized", "total_minor": 999}\n')
    assert objects(client, bucket)[key] == finalized.replace(b"100", b"101")


def test_a_published_partition_is_one_atomic_object_and_a_failed_write_publishes_nothing(s3, tmp_path):
    url, client, bucket = s3
    wc = _copy(url, tmp_path / "wc")
    key = "models/fct_usage_by_day/day=2026-02-01/data.parquet"
    dest = wc.root / key
    versions = [bytes([65 + i]) * (6 << 20) for i in range(3)]  # 6 MiB each: more than one part of a transfer
    durable.write_bytes(dest, versions[0])
    seen: set[bytes] = set()
    done = threading.Event()

    def reader():
        while not done.is_set():
            body = client.get_object(Bucket=bucket, Key=f"billing/{key}")["Body"].read()
            seen.add(body[:1] + body[-1:] + str(len(body)).encode())
            assert body in versions, "a reader saw a partial or mixed object"

    t = threading.Thread(target=reader)
    t.start()
    try:
        for v in versions[1:]:
            durable.write_bytes(dest, v)
    finally:
        done.set()
        t.join()
    assert seen and all(x[:1] == x[1:2] for x in seen)

    # a writer that fails before its publish leaves the object and the copy as they were
    def failing_writer():
        with durable.staged(dest) as tmp:
            tmp.write_bytes(b"half a partition")
            raise RuntimeError("validation failed")

    with pytest.raises(RuntimeError):
        failing_writer()
    assert objects(client, bucket)[key] == versions[-1] == dest.read_bytes()
    # a removal removes the object; another copy's pull removes its file
    other = _copy(url, tmp_path / "other")
    assert (other.root / key).read_bytes() == versions[-1]
    durable.remove(dest)
    assert key not in objects(client, bucket)
    assert other.pull()["removed"] == 1 and not (other.root / key).exists()


def test_an_upload_that_fails_publishes_nothing_locally(s3, tmp_path, monkeypatch):
    url, client, bucket = s3
    wc = _copy(url, tmp_path / "wc")
    dest = wc.root / "outbox" / "day=2026-02-01.parquet"
    durable.write_bytes(dest, b"old")
    monkeypatch.setattr(wc.store, "endpoint", f"http://127.0.0.1:{free_port()}")
    wc.store.client = boto3.client("s3", endpoint_url=wc.store.endpoint, region_name="us-east-1")
    with pytest.raises(storage.StorageError, match=r"cannot reach the S3 endpoint .*AWS_ENDPOINT_URL"):
        durable.write_bytes(dest, b"new")
    assert dest.read_bytes() == b"old" and objects(client, bucket)["outbox/day=2026-02-01.parquet"] == b"old"


# --------------------------------------------------------------------------- bad settings: exit 2, no traceback


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"BILLING_DATA_URL": "http://bucket/prefix"}, "BILLING_DATA_URL='http://bucket/prefix' is not an s3:// URL; set BILLING_DATA_URL to s3://"),
        ({"BILLING_DATA_URL": "s3://Bad_Bucket/x"}, "names no valid bucket"),
        ({"BILLING_DATA_URL": "s3://bucket/a//b"}, "empty, '.' or '..' path segment"),
        ({"BILLING_DATA_URL": "s3://[billing/x"}, "BILLING_DATA_URL='s3://[billing/x' is not a valid URL"),
        ({"BILLING_DATA_URL": "s3://bucket/x", "AWS_ENDPOINT_URL": "http://[::1"}, "AWS_ENDPOINT_URL='http://[::1' is not an http(s) URL"),
        ({"BILLING_DATA_URL": "s3://bucket/x", "AWS_ENDPOINT_URL": "127.0.0.1:9000"}, "AWS_ENDPOINT_URL='127.0.0.1:9000' is not an http(s) URL"),
        ({"BILLING_DATA_URL": "s3://bucket/x", "AWS_ACCESS_KEY_ID": None}, "no S3 credentials were found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        ({"BILLING_DATA_URL": "s3://no-such-bucket/x"}, "the bucket 'no-such-bucket' of BILLING_DATA_URL does not exist"),
    ],
)
def test_bad_storage_settings_exit_2_naming_the_variable_and_the_fix(s3, paths, tmp_path, monkeypatch, capsys, env, expected):
    from billing_dags.cli.main import main

    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    for k, v in env.items():
        if v is None:
            monkeypatch.delenv(k)
        else:
            monkeypatch.setenv(k, v)
    code = main(["invoices", "--month", "2026-02"])
    err = capsys.readouterr().err.replace("\n", " ")
    assert code == 2 and expected in err, err
    assert "Traceback" not in err and "testing" not in err


def test_an_unreachable_endpoint_exits_2_naming_the_variable(small_seeds, tmp_path):
    """The CLI as users run it, with an endpoint where nothing listens."""
    env = cli_env(tmp_path, "data", small_seeds, **CREDENTIALS, BILLING_DATA_URL="s3://bucket/x", AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    r = subprocess.run([*BILLING, "invoices", "--month", "2026-02"], env=env, capture_output=True, text=True, timeout=300)
    out = (r.stdout + r.stderr).replace("\n", " ")
    assert r.returncode == 2, out
    assert "cannot reach the S3 endpoint http://127.0.0.1:" in out and "(AWS_ENDPOINT_URL)" in out and "fix AWS_ENDPOINT_URL" in out
    assert "Traceback" not in out


# --------------------------------------------------------------------------- the default and what stays local


def test_without_a_url_the_local_folder_is_the_warehouse_and_nothing_is_mirrored(paths, monkeypatch):
    monkeypatch.delenv("BILLING_DATA_URL", raising=False)
    from billing_dags.core.settings import resolve_paths

    assert resolve_paths().data_dir == paths.data_dir and durable._MIRRORS == []


@pytest.mark.parametrize(
    ("key", "mirrored", "guarded"),
    [
        ("raw/samples/date=2026-02-01/part-simulate.parquet", True, False),
        ("models/fct_usage_by_day/day=2026-02-01/data.parquet", True, False),
        ("invoices/2026-02/mp-001.json", True, True),
        ("invoices/registry.json", True, True),
        ("outbox/date=2026-02-01/events.parquet", True, True),
        ("invoices/.registry.lock", False, True),
        ("raw/samples/date=2026-02-01/.part-simulate.parquet.tmp-1-2", False, False),
        ("landing/2026-02-01/segment-1.bin", False, False),
        ("warehouse.duckdb", False, False),
        (".sync/index.json", False, False),
    ],
)
def test_what_lives_in_the_bucket_and_what_is_put_conditionally(key, mirrored, guarded):
    assert storage.is_mirrored(key) is mirrored
    assert storage.is_guarded(key) is guarded


class LocalStore(storage.Store):
    """A folder as a store, for the working copy without a server: ETag = MD5 of the bytes (as S3's for a
    single PUT), published with ``durable``, conditional puts checked under a lock file (one machine)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.url = self.root.as_uri()

    def list(self, prefix: str = "") -> dict[str, storage.Entry]:
        out = {}
        for p in sorted(self.root.rglob("*")):
            key = p.relative_to(self.root).as_posix()
            if p.is_file() and key.startswith(prefix) and not any(part.startswith(".") for part in key.split("/")):
                out[key] = storage.Entry(storage._md5(p.read_bytes()), p.stat().st_size)
        return out

    def read(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        with durable.exclusive_lock(self.root / ".store.lock"):
            if if_match is not None or if_none_match:
                current = self.read(key)
                if if_none_match and current is not None:
                    raise storage.ConcurrentWriteError(f"{self.url}/{key} already exists; it is not overwritten")
                if if_match is not None and (current is None or storage._md5(current) != if_match):
                    raise storage.ConcurrentWriteError(f"{self.url}/{key} changed since it was read; rerun the step")
            durable.write_bytes(self.root / key, data, mirrored=False)
        return storage._md5(data)

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        with durable.exclusive_lock(self.root / ".store.lock"):
            current = self.read(key)
            if if_match is not None and current is not None and storage._md5(current) != if_match:
                raise storage.ConcurrentWriteError(f"{self.url}/{key} changed since it was read; rerun the step")
            (self.root / key).unlink(missing_ok=True)


def test_the_local_store_keeps_the_same_contract(tmp_path):
    """The working copy over a folder as its store (no server): conditional puts, pulls and removals."""
    store = LocalStore(tmp_path / "bucket")
    a, b = storage.WorkingCopy(store, tmp_path / "a"), storage.WorkingCopy(store, tmp_path / "b")
    key = "invoices/2026-02/mp-001.json"
    for wc in (a, b):
        durable.add_mirror(wc)
    try:
        durable.write_bytes(a.root / key, b"finalized\n")
        with pytest.raises(storage.ConcurrentWriteError, match="already exists"):
            durable.write_bytes(b.root / key, b"other\n")
        assert b.pull()["downloaded"] == 1 and (b.root / key).read_bytes() == b"finalized\n"
        durable.write_bytes(a.root / "models/m/day=2026-02-01/data.parquet", b"rows")
        assert store.exists("models/m/day=2026-02-01/data.parquet") and set(store.list()) == {key, "models/m/day=2026-02-01/data.parquet"}
        durable.remove(a.root / key)
        assert store.read(key) is None and b.pull()["removed"] == 1 and not (b.root / key).exists()
    finally:
        for wc in (a, b):
            durable.remove_mirror(wc)


def test_a_pull_between_reading_and_writing_the_number_registry_never_gives_a_number_out_twice(s3, tmp_path, monkeypatch):
    """Two processes share machine 1's working copy; machine 2 numbers an invoice while process A is between
    reading the registry and writing it back, and process B's pull brings that registry into the shared copy.
    A's write must be refused (it read the version before machine 2's), not put over the object B pulled."""
    from datetime import date

    from billing_dags.billing import numbering
    from billing_dags.core.settings import Paths

    url, client, bucket = s3
    month = date(2026, 2, 1)
    m1, m2 = _copy(url, tmp_path / "m1"), _copy(url, tmp_path / "m2")
    p1, p2 = (Paths(wc.root, tmp_path / "seeds", 1) for wc in (m1, m2))
    assert numbering.assign_invoice_numbers(p2, month, ["c-a"]) == {"c-a": "INV-2026-000001"}
    m1.pull()

    read = numbering.read_registry
    interleaved = []

    def read_then_machine_2_numbers_and_process_b_pulls(paths):
        reg = read(paths)
        if paths is p1 and not interleaved:
            interleaved.append(numbering.assign_invoice_numbers(p2, month, ["c-c"]))
            storage.WorkingCopy(storage.open_store(url), m1.root).pull()  # process B, same folder as A
        return reg

    monkeypatch.setattr(numbering, "read_registry", read_then_machine_2_numbers_and_process_b_pulls)
    with pytest.raises(storage.ConcurrentWriteError):
        numbering.assign_invoice_numbers(p1, month, ["c-b"])
    assert interleaved == [{"c-c": "INV-2026-000002"}]
    monkeypatch.setattr(numbering, "read_registry", read)
    stored = numbering.json.loads(objects(client, bucket)["invoices/registry.json"])["numbers"]
    assert stored == {"2026-02/c-a": "INV-2026-000001", "2026-02/c-c": "INV-2026-000002"}
    # the step rerun reads the registry as it now is and takes the next number
    assert numbering.assign_invoice_numbers(p1, month, ["c-b"]) == {"c-b": "INV-2026-000003"}


def test_a_draft_written_from_a_copy_a_pull_replaced_meanwhile_never_overwrites_the_finalized_invoice(s3, tmp_path, monkeypatch):
    """Process A on machine 1 reads a customer's stored invoice (none yet) to write its draft; meanwhile machine 2
    finalizes it and process B's pull brings the finalized files into machine 1's folder. A's JSON, its page and
    the removal of a draft's PDF are refused: the bucket keeps machine 2's finalized invoice, every file of it."""
    from datetime import UTC, date, datetime

    from test_adjustments import CURRENCIES, CUSTOMERS, PLANS, lines, manifest

    from billing_dags.billing import store
    from billing_dags.billing.build import build_invoices
    from billing_dags.core.settings import Paths

    url, client, bucket = s3
    jan = date(2025, 1, 1)
    m1, m2 = _copy(url, tmp_path / "m1"), _copy(url, tmp_path / "m2")
    p1, p2 = (Paths(wc.root, tmp_path / "seeds", 1) for wc in (m1, m2))

    def invoices(p, now, usage_minor):
        return build_invoices(lines(jan, usage_minor), CUSTOMERS, PLANS, CURRENCIES, jan, now=now, manifest=manifest(), paths=p)

    finalized = invoices(p2, datetime(2025, 6, 1, tzinfo=UTC), 625)
    draft = invoices(p1, datetime(2025, 2, 1, 1, tzinfo=UTC), 999)
    assert (finalized[0]["status"], draft[0]["status"]) == ("finalized", "draft")
    read = store.read_stored
    interleaved = []

    def read_then_machine_2_finalizes_and_process_b_pulls(path):
        doc = read(path)
        # at the read the draft is decided on (an earlier one, of the PDFs to lay out, only looks)
        if path.is_relative_to(m1.root) and not interleaved and sys._getframe(1).f_code.co_name == "_write_invoice":
            interleaved.append(store.write_invoice_files(p2, finalized)["by_status"]["finalized"])
            storage.WorkingCopy(storage.open_store(url), m1.root).pull()
        return doc

    monkeypatch.setattr(store, "read_stored", read_then_machine_2_finalizes_and_process_b_pulls)
    with pytest.raises(storage.ConcurrentWriteError):
        store.write_invoice_files(p1, draft)
    assert interleaved == [1]
    stored = objects(client, bucket)
    assert json_of(stored["invoices/2025-01/acme.json"])["status"] == "finalized"
    assert {k: v for k, v in stored.items() if k.startswith("invoices/2025-01/acme.")} == {
        k: (m2.root / k).read_bytes() for k in stored if k.startswith("invoices/2025-01/acme.")
    }
    assert b"9.99" not in stored["invoices/2025-01/acme.html"]
    assert stored["invoices/2025-01/acme.pdf"].startswith(b"%PDF")  # the draft's "remove my PDF" did not reach it


def json_of(data: bytes) -> dict:
    import json

    return json.loads(data)


def test_a_removal_never_deletes_a_version_of_an_invoice_the_copy_did_not_see(s3, tmp_path):
    """Machine 1 withdraws a draft (or drops a draft's PDF) from a copy made before machine 2 finalized the
    invoice: the removal is refused and machine 2's objects stay; an object the copy did see is removed."""
    url, client, bucket = s3
    m1, m2 = _copy(url, tmp_path / "m1"), _copy(url, tmp_path / "m2")
    page, pdf = "invoices/2025-01/acme.html", "invoices/2025-01/acme.pdf"
    durable.write_bytes(m1.root / page, b"draft\n")
    m2.pull()
    durable.write_bytes(m2.root / page, b"finalized\n")
    durable.write_bytes(m2.root / pdf, b"%PDF finalized\n")
    with pytest.raises(storage.ConcurrentWriteError):
        durable.remove(m1.root / page)  # m1 holds the draft's version: the object is another one now
    with pytest.raises(storage.ConcurrentWriteError, match="not removed"):
        durable.remove(m1.root / pdf)  # m1 never saw a PDF there
    assert objects(client, bucket) == {page: b"finalized\n", pdf: b"%PDF finalized\n"}
    m1.pull()
    assert durable.remove(m1.root / pdf) and set(objects(client, bucket)) == {page}
    assert durable.remove(m1.root / "invoices/2025-01/other.pdf") is False  # nothing anywhere: nothing to refuse


def test_a_multipart_upload_records_its_own_version_even_when_another_writer_replaces_it_at_once(s3, tmp_path, monkeypatch):
    """A file over MULTIPART_BYTES goes up in parts; another machine puts the same key right after the upload
    completes. The copy records the version it uploaded (not the newer one), so its next pull brings the
    other machine's bytes instead of keeping its own as if they were current."""
    url, client, bucket = s3
    monkeypatch.setattr(storage, "MULTIPART_BYTES", 5 << 20)  # S3's smallest part
    wc = _copy(url, tmp_path / "m1")
    key = "raw/samples/date=2026-02-01/part-sim.parquet"
    ours, theirs = os.urandom(11 << 20), b"the other machine's bytes\n"
    real_complete = wc.store.client.complete_multipart_upload
    completed = []

    def complete_then_another_writer_puts(**kwargs):
        answer = real_complete(**kwargs)
        completed.append(client.get_object(Bucket=bucket, Key=kwargs["Key"])["Body"].read() == ours)
        client.put_object(Bucket=bucket, Key=kwargs["Key"], Body=theirs)
        return answer

    monkeypatch.setattr(wc.store.client, "complete_multipart_upload", complete_then_another_writer_puts)
    durable.write_bytes(wc.root / key, ours)
    assert completed == [True]  # it went up in parts, whole
    assert wc.pull()["downloaded"] == 1 and (wc.root / key).read_bytes() == theirs


def test_a_refused_invoice_in_a_batch_puts_none_of_its_files_and_the_others_whole(s3, tmp_path):
    """A batch of two invoices (JSON and page each) where one JSON was read at a version another machine has
    replaced since: that invoice's files are not put at all (no page beside a JSON it does not render); the
    other invoice goes up whole, JSON and page."""
    url, client, bucket = s3
    m1, m2 = _copy(url, tmp_path / "m1"), _copy(url, tmp_path / "m2")
    folder = "invoices/2026-02"
    for name in ("a", "b"):
        for ext in ("json", "html"):
            durable.write_bytes(m1.root / folder / f"{name}.{ext}", f"{name} draft {ext}\n".encode())
    m2.pull()
    durable.write_bytes(m2.root / folder / "b.json", b"b finalized json\n")  # after machine 1's copy
    for name in ("a", "b"):
        durable.read_for_update(m1.root / folder / f"{name}.json")
    batch = durable.Batch()
    for name in ("a", "b"):
        for ext in ("json", "html"):
            batch.write(m1.root / folder / f"{name}.{ext}", f"{name} new {ext}\n".encode())
    with pytest.raises(storage.ConcurrentWriteError):
        batch.commit()  # (commit aborts the batch's temporary files when the publish fails)
    batch.close()
    assert {k[len(folder) + 1 :]: v for k, v in objects(client, bucket).items()} == {
        "a.json": b"a new json\n",
        "a.html": b"a new html\n",
        "b.json": b"b finalized json\n",
        "b.html": b"b draft html\n",
    }
