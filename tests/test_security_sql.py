"""`billing sql` is read-only: queries over the warehouse's own files, nothing else.

Each test runs on its own copy of a warehouse built once by a small simulated `billing run` (one
customer, October 2026, hourly samples): the CLI as a subprocess, and the long list of refused
statements through the same entry point in process (a subprocess costs seconds each here).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from billing_dags.cli.main import main
from billing_dags.core.settings import PROJECT_ROOT

pytestmark = pytest.mark.acceptance

DOCS = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
CUSTOMER = "mp-003"  # the customer of the dispute queries in docs/disputes.md
CANARY = "sk_test_canary_4f1d9a"  # an environment value no query may reveal


def _env(tmp: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "STRIPE_", "PROMETHEUS_"))}
    env["DAGSTER_HOME"] = str(tmp / "dagster_home")
    (tmp / "dagster_home").mkdir(exist_ok=True)
    (tmp / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return {**env, **extra}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A template warehouse (seeds of one customer, a simulated month billed); tests copy it."""
    root = tmp_path_factory.mktemp("template")
    seeds = root / "seeds"
    shutil.copytree(PROJECT_ROOT / "seeds", seeds)
    for name in ("customers.csv", "subscriptions.csv", "credits.csv", "report_tokens.csv", "customer_billing.csv"):
        with (seeds / name).open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if r["customer_id"] == CUSTOMER]
            fields = reader.fieldnames
        with (seeds / name).open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "billing_dags.cli.main",
            "--data-dir",
            str(root / "data"),
            "--seeds-dir",
            str(seeds),
            "run",
            "--month",
            "2026-10",
            "--interval",
            "3600",
        ],
        cwd=root,
        env=_env(root, BILLING_INVOICE_PDF="0"),  # no test here reads a PDF: WeasyPrint costs seconds of CPU
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    return root


@pytest.fixture
def wh(built, tmp_path) -> Path:
    """This test's own copy of the warehouse: tmp_path/data and tmp_path/seeds."""
    shutil.copytree(built / "data", tmp_path / "data")
    shutil.copytree(built / "seeds", tmp_path / "seeds")
    return tmp_path


def billing_sql(wh: Path, query: str, *args: str) -> subprocess.CompletedProcess:
    """`billing sql QUERY --format json`, run from the folder holding data/ (as the README does)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "billing_dags.cli.main",
            "--data-dir",
            str(wh / "data"),
            "--seeds-dir",
            str(wh / "seeds"),
            "sql",
            query,
            "--format",
            "json",
            *args,
        ],
        cwd=wh,
        env=_env(wh, STRIPE_API_KEY=CANARY, BILLING_REPORT_TOKEN=CANARY),
        capture_output=True,
        text=True,
        timeout=120,
    )


def billing_sql_in_process(wh: Path, query: str, capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.chdir(wh)
    code = main(["--data-dir", str(wh / "data"), "--seeds-dir", str(wh / "seeds"), "sql", query, "--format", "json"])
    out = capsys.readouterr()
    return code, out.out, out.err


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def readme_queries() -> list[str]:
    """Every `billing sql "..."` example of the README and docs/, and the dispute guide's SQL block."""
    text = "\n".join(doc.read_text() for doc in DOCS)
    queries = re.findall(r'billing sql "([^"]+)"', text)
    block = re.search(r"Five queries support\s+uses:\s+```sql\n(.*?)```", text, re.S).group(1)
    body = "\n".join(line for line in block.splitlines() if not line.startswith("--"))
    queries += [q.strip() for q in body.split(";") if q.strip()]
    return [q for q in dict.fromkeys(queries) if q != "..."]


#: queries the CLI itself suggests (in its messages and the demo's output)
CLI_QUERIES = ["show tables", "select customer_id from seed_customers", "select * from fct_invoice_lines limit 5"]


def test_readme_queries_are_found():
    queries = readme_queries()
    assert len(queries) >= 7, queries
    assert any("fct_usage_by_day" in q for q in queries) and any("read_parquet('data/outbox" in q for q in queries)


def test_every_readme_query_still_works(wh, capsys, monkeypatch):
    """The dispute queries and every other `billing sql` example of the docs answer with rows (through
    the CLI's entry point in process, from the folder holding data/ as the README runs them; the
    subprocess tests below show the same entry point as its own process)."""
    for query in readme_queries() + CLI_QUERIES:
        code, out, err = billing_sql_in_process(wh, query, capsys, monkeypatch)
        assert code == 0, (query, err)
        rows = json.loads(out)
        if "customer_id is null" not in query:  # series that bill to nobody: none may exist
            assert rows, query


OUTSIDE_READS = [
    ("select * from read_text('/etc/passwd')", "/etc/passwd"),
    ("select * from read_csv('/etc/passwd', header = false)", "/etc/passwd"),
    ("select * from read_text('data/../../../../../../etc/passwd')", "etc/passwd"),
    ("select * from glob('/etc/*')", "/etc/*"),
    ("select * from read_blob('/proc/self/environ')", "/proc/self/environ"),
    ("select * from read_text('secret.txt')", "secret.txt"),
    ("select * from read_text('data/../secret.txt')", "secret.txt"),
    ("select * from read_csv('https://example.com/x.csv')", "https://example.com/x.csv"),
]


@pytest.mark.parametrize(("query", "named"), OUTSIDE_READS)
def test_files_outside_the_warehouse_are_not_readable(wh, query, named, capsys, monkeypatch):
    (wh / "secret.txt").write_text(f"token={CANARY}\n")
    code, out, err = billing_sql_in_process(wh, query, capsys, monkeypatch)
    assert code == 2, out[:500]
    assert "root:" not in out and CANARY not in out + err
    assert named in err and "refused" in err and str(wh / "data") in err, err


def test_reading_etc_passwd_through_the_cli_is_refused(wh):
    r = billing_sql(wh, "select * from read_text('/etc/passwd')")
    assert r.returncode == 2 and "root:" not in r.stdout
    assert "/etc/passwd" in r.stderr and "refused" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize(
    "query",
    [
        "select getenv('STRIPE_API_KEY')",
        "select * from read_text('/proc/self/environ')",
        "select * from duckdb_settings()",
        "select current_setting('home_directory')",
        "select * from duckdb_secrets()",
    ],
)
def test_environment_variables_are_not_readable(wh, query, capsys, monkeypatch):
    # in process (as the refused statements run): the canary is in this process's own environment
    monkeypatch.setenv("STRIPE_API_KEY", CANARY)
    monkeypatch.setenv("BILLING_REPORT_TOKEN", CANARY)
    assert os.environ["STRIPE_API_KEY"] == CANARY
    _code, out, err = billing_sql_in_process(wh, query, capsys, monkeypatch)
    assert CANARY not in out + err


@pytest.mark.parametrize(
    ("query", "refused"),
    [
        # an invoice line's amount rewritten in its partition, a raw day emptied
        (
            (
                "copy (select * replace (amount_minor * 100 as amount_minor) from fct_invoice_lines) "
                "to 'data/models/fct_invoice_lines/month=2026-10/data.parquet' (format parquet)"
            ),
            "COPY",
        ),
        ("copy (select * from raw_samples where false) to 'data/raw/samples/date=2026-10-12/part-simulated.parquet' (format parquet)", "COPY"),
        ("copy (select 1) to 'outside.csv'", "COPY"),
        ("export database 'data/export'", "EXPORT"),
        ("insert into fct_invoice_lines select * from fct_invoice_lines", "INSERT"),
        ("update fct_invoice_lines set amount_minor = 0", "UPDATE"),
        ("delete from fct_invoice_lines", "DELETE"),
        ("truncate fct_invoice_lines", "DELETE"),
        ("drop view fct_invoice_lines", "DROP"),
        ("create table t as select 1", "CREATE"),
        ("create secret (type s3, key_id 'x', secret 'y')", "CREATE"),
        ("attach 'data/warehouse.duckdb' as w; drop view w.fct_invoice_lines", "ATTACH"),
        ("install httpfs", "LOAD"),
        ("load httpfs", "LOAD"),
        ("set enable_external_access = true", "SET"),
        ("reset allowed_directories", "SET"),
        ("pragma enable_profiling", "PRAGMA"),
        ("call checkpoint()", "CALL"),
        ("explain analyze copy (select 1) to 'data/x.csv'", "EXPLAIN"),
        ("begin", "TRANSACTION"),
        ("update extensions", "update extensions"),
        # one write among queries: nothing runs
        ("select 1; copy (select 1) to 'data/x.csv'; select 2", "COPY"),
        ("with x as (select 1) select * from x; delete from fct_invoice_lines", "DELETE"),
    ],
)
def test_statements_other_than_queries_are_refused(wh, query, refused, capsys, monkeypatch):
    before = _snapshot(wh)
    code, out, err = billing_sql_in_process(wh, query, capsys, monkeypatch)
    assert code == 2, (out[:300], err)
    assert "refused" in err and refused in err, err
    assert _snapshot(wh) == before  # no file written, changed or removed


@pytest.mark.parametrize(
    ("query", "refused"),
    [
        (
            (
                "copy (select * replace (amount_minor * 100 as amount_minor) from fct_invoice_lines) "
                "to 'data/models/fct_invoice_lines/month=2026-10/data.parquet' (format parquet)"
            ),
            "COPY",
        ),
        ("attach 'data/warehouse.duckdb' as w; drop view w.fct_invoice_lines", "ATTACH"),
        ("select 1; copy (select * from raw_samples where false) to 'data/raw/samples/date=2026-10-12/part-simulated.parquet'", "COPY"),
    ],
)
def test_writes_through_the_cli_are_refused(wh, query, refused):
    before = _snapshot(wh / "data")
    r = billing_sql(wh, query)
    assert r.returncode == 2, (r.stdout[:300], r.stderr)
    assert "refused" in r.stderr and refused in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert _snapshot(wh / "data") == before


def test_a_query_over_the_outbox_by_absolute_path_works(wh):
    r = billing_sql(wh, f"select count(*) as n from read_parquet('{wh / 'data' / 'outbox'}/*/*.parquet')")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["n"] > 0
