"""Where things live. Resolved when called (never at import time) from the environment."""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from billing_dags.core.calendar import month_start
from billing_dags.core.errors import InputError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SQL_MODELS_DIR = PROJECT_ROOT / "sql_models"

#: lookback for a series' previous sample (DESIGN rule 3) and the Stripe send horizon (rule 9)
EDGE_LOOKBACK_DAYS = 35
#: gauge samples hold until the next sample, at most this long (Prometheus staleness, rule 5)
STALENESS_MS = 5 * 60 * 1000
#: days after a period's end before its invoice may be finalized (rule 8)
DEFAULT_GRACE_DAYS = 3
#: days raw samples, landing segments and usage reports are kept (rule 13)
DEFAULT_RETENTION_DAYS = 90


@dataclass(frozen=True)
class Paths:
    """The on-disk layout under BILLING_DATA_DIR (see DESIGN.md, "Raw layout")."""

    data_dir: Path
    seeds_dir: Path
    #: shards by customer (BILLING_SHARDS; core/shards.py): 1 is the unsharded layout
    shards: int = 1

    @property
    def raw_samples(self) -> Path:
        return self.data_dir / "raw" / "samples"

    @property
    def raw_series(self) -> Path:
        return self.data_dir / "raw" / "series"

    @property
    def raw_carry_in(self) -> Path:
        return self.data_dir / "raw" / "carry_in"

    @property
    def landing(self) -> Path:
        return self.data_dir / "landing"

    @property
    def models(self) -> Path:
        return self.data_dir / "models"

    @property
    def invoices(self) -> Path:
        return self.data_dir / "invoices"

    @property
    def outbox(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def warehouse_db(self) -> Path:
        return self.data_dir / "warehouse.duckdb"


def resolve_paths(data_dir: str | os.PathLike | None = None, seeds_dir: str | os.PathLike | None = None, *, sync: bool = True) -> Paths:
    """Paths from explicit arguments, else BILLING_DATA_DIR / BILLING_SEEDS_DIR, else ./data and ./seeds.

    With BILLING_DATA_URL (an s3:// URL) the data folder is the local working copy of the bucket
    (``core.storage``): unless ``sync`` is False it is brought in step with the bucket first, and every
    publish from this process goes to the bucket too.
    """
    url = os.environ.get("BILLING_DATA_URL", "").strip()
    data = data_dir or os.environ.get("BILLING_DATA_DIR")
    if url and not data:
        from billing_dags.core import storage

        data = storage.default_working_copy(url)
    seeds = seeds_dir or os.environ.get("BILLING_SEEDS_DIR")
    if not seeds:
        seeds = "seeds" if Path("seeds/meters.csv").exists() else PROJECT_ROOT / "seeds"
    paths = Paths(Path(data or "data").expanduser().resolve(), Path(seeds).expanduser().resolve(), shard_count())
    if url and sync:
        from billing_dags.core import storage

        storage.attach(url, paths.data_dir).pull()
    return paths


class SettingsError(InputError):
    """A setting from the environment that cannot be used; the message names the variable and the fix."""


#: the largest BILLING_SHARDS: more only multiplies the files and runs of a day
MAX_SHARDS = 256


def parse_shards(value: str | None) -> int:
    """BILLING_SHARDS as a number of shards: unset or empty is 1 (unsharded); else a whole number 1..MAX_SHARDS."""
    text = (value or "").strip()
    if not text:
        return 1
    fix = f"set it to a whole number of shards from 1 to {MAX_SHARDS} (e.g. BILLING_SHARDS=8), or unset it for one shard (the unsharded layout)"
    if not (text.isascii() and text.isdigit()):
        raise SettingsError(f"BILLING_SHARDS={value!r} is not a whole number; {fix}")
    n = int(text)
    if not 1 <= n <= MAX_SHARDS:
        raise SettingsError(f"BILLING_SHARDS={value!r} is out of range; {fix}")
    return n


def shard_count(environ: dict | None = None) -> int:
    """The number of shards by customer (BILLING_SHARDS, default 1: the unsharded layout; core/shards.py)."""
    env = os.environ if environ is None else environ
    return parse_shards(env.get("BILLING_SHARDS"))


#: run tags recording the settings a run was launched with: its steps, wherever they execute (a Celery worker,
#: a Kubernetes Job), refuse to run with others (check_launched_settings)
SHARDS_TAG = "billing/shards"
DATA_URL_TAG = "billing/data_url"


def launched_settings_tags(environ: dict | None = None) -> dict[str, str]:
    """The tags of every run launched by this process's code location: its BILLING_SHARDS and BILLING_DATA_URL
    (empty: the local folder)."""
    env = os.environ if environ is None else environ
    return {SHARDS_TAG: str(shard_count(env)), DATA_URL_TAG: env.get("BILLING_DATA_URL", "").strip()}


def check_launched_settings(tags, environ: dict | None = None) -> None:
    """A SettingsError when this process's BILLING_SHARDS or BILLING_DATA_URL differ from those the run was
    launched with (``tags``; a run without them is not checked). A worker with other shards would compute
    its steps in another layout, one with another warehouse in another place: the run's results would be
    wrong or missing, silently."""
    env = os.environ if environ is None else environ
    mine = launched_settings_tags(env)
    for tag, var in ((SHARDS_TAG, "BILLING_SHARDS"), (DATA_URL_TAG, "BILLING_DATA_URL")):
        if tag in tags and tags[tag] != mine[tag]:
            shown = lambda v, var=var: f"{var}={v}" if v else f"{var} unset"  # noqa: E731
            raise SettingsError(
                f"this run was launched with {shown(tags[tag])}, but this process has {shown(mine[tag])}; set the same "
                f"{var} wherever runs are launched and on every worker (docs/scale-out.md), restart the worker, and rerun"
            )


_MONTH_START_RE = re.compile(r"^(\d{4})-(\d{2})(?:-(\d{2}))?$")


def parse_partitions_start(value: str) -> date:
    """BILLING_PARTITIONS_START as a date: a month (YYYY-MM) or its first day (YYYY-MM-01)."""
    m = _MONTH_START_RE.match(value.strip())
    fix = "set it to the first month to bill, e.g. BILLING_PARTITIONS_START=2026-10 (or unset it to start at the earliest subscription)"
    if not m:
        raise SettingsError(f"BILLING_PARTITIONS_START={value!r} is not a month (YYYY-MM); {fix}")
    year, month, day = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
    try:
        start = date(year, month, day)
    except ValueError:
        raise SettingsError(f"BILLING_PARTITIONS_START={value!r} is not a valid date; {fix}") from None
    if day != 1:
        raise SettingsError(
            f"BILLING_PARTITIONS_START={value!r} is not the first day of a month (monthly invoices start with the daily partitions); use {start:%Y-%m}"
        )
    if start.year < 2000:
        raise SettingsError(f"BILLING_PARTITIONS_START={value!r} is before 2000; {fix}")
    return start


def earliest_subscription_month(seeds_dir: Path) -> date | None:
    """The first day of the month of the earliest subscription start_date in the seeds (None: no subscription).

    Only the start_date column is read (the seeds' own validation reports bad rows, with line and fix).
    """
    path = seeds_dir / "subscriptions.csv"
    if not path.exists():
        return None
    starts = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                starts.append(date.fromisoformat((row.get("start_date") or "").strip()))
            except ValueError:
                continue
    return month_start(min(starts)) if starts else None


def partitions_start(environ: dict | None = None, seeds_dir: str | os.PathLike | None = None) -> date:
    """The first daily and monthly partition: BILLING_PARTITIONS_START, else the month of the earliest subscription.

    No usage is billed before a subscription starts, so earlier partitions would only show as missing in the UI.
    """
    env = os.environ if environ is None else environ
    value = env.get("BILLING_PARTITIONS_START", "").strip()
    if value:
        return parse_partitions_start(value)
    seeds = resolve_paths(seeds_dir=seeds_dir or env.get("BILLING_SEEDS_DIR") or None, sync=False).seeds_dir
    first = earliest_subscription_month(seeds)
    if first is None:
        raise SettingsError(
            f"BILLING_PARTITIONS_START is not set and {seeds / 'subscriptions.csv'} has no subscription start_date to "
            "start the partitions at; set BILLING_PARTITIONS_START to the first month to bill (e.g. 2026-10), or "
            "BILLING_SEEDS_DIR to the seeds folder"
        )
    return first


# --------------------------------------------------------------------------- how runs execute their steps

#: BILLING_EXECUTOR: in_process (the default: every step in the run's process), multiprocess (a process
#: per step on the run's machine), celery (each step a Celery task on workers anywhere, Redis broker) or
#: k8s_job (each step a Kubernetes Job, on a cluster deployed with Dagster's Helm chart)
EXECUTORS = ("in_process", "multiprocess", "celery", "k8s_job")
#: broker transports a Celery worker of this project can use (kombu's names); Redis is the tested one
CELERY_BROKER_SCHEMES = ("redis", "rediss", "sentinel", "amqp", "amqps", "pyamqp", "sqs")
#: the Celery queue the steps go to and the workers consume (dagster-celery's default queue)
CELERY_QUEUE = "dagster"
#: the queue of the steps that read the receivers' landing (remote-write segments, the usage-report store):
#: with the warehouse in a bucket the landing is local to the receivers' machine (never an object), so only
#: its worker (`billing worker --landing`) may compact it; with a shared folder every worker sees it
CELERY_LANDING_QUEUE = "billing-landing"
#: dagster-celery's step tag naming the queue a step goes to
CELERY_QUEUE_TAG = "dagster-celery/queue"
LANDING_OP_TAGS = {CELERY_QUEUE_TAG: CELERY_LANDING_QUEUE}


def worker_queues(landing: bool, environ: dict | None = None) -> list[str]:
    """The queues a `billing worker` consumes: the steps' queue, and the landing's with ``landing`` or when the
    warehouse is a shared folder (no BILLING_DATA_URL: every machine sees the landing)."""
    env = os.environ if environ is None else environ
    if landing or not env.get("BILLING_DATA_URL", "").strip():
        return [CELERY_QUEUE, CELERY_LANDING_QUEUE]
    return [CELERY_QUEUE]


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (error messages and logs never show a credential)."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class ExecutorSettings:
    """The executor of every run, from the environment (``executor_settings``).

    For celery: ``broker_var`` and ``backend_var`` name the variables holding the broker's and the result
    backend's URLs (the executor reads them when a run starts, so no URL, password included, is ever in a
    run's config or the UI); ``backend_var`` is None when results go back over the broker (``rpc://``).
    """

    kind: str = "in_process"
    broker_var: str | None = None
    backend_var: str | None = None

    def broker(self, environ: dict | None = None) -> str | None:
        env = os.environ if environ is None else environ
        return env.get(self.broker_var) if self.broker_var else None

    def backend(self, environ: dict | None = None) -> str:
        env = os.environ if environ is None else environ
        return env[self.backend_var] if self.backend_var else "rpc://"


def _check_url(name: str, value: str, schemes: tuple[str, ...] | None, fix: str) -> None:
    parts = urlsplit(value)
    shown = redact_url(value)
    if not parts.scheme or "://" not in value:
        raise SettingsError(f"{name}={shown!r} is not a URL; {fix}")
    if schemes is not None and parts.scheme not in schemes:
        raise SettingsError(f"{name}={shown!r}: {parts.scheme}:// is not a Celery broker transport ({', '.join(schemes)}); {fix}")
    if parts.scheme in ("redis", "rediss", "amqp", "amqps", "pyamqp") and not parts.hostname:
        raise SettingsError(f"{name}={shown!r} names no host; {fix}")
    try:
        parts.port  # noqa: B018  (a bad port raises here)
    except ValueError:
        raise SettingsError(f"{name}={shown!r} has a port that is not a number; {fix}") from None


def executor_settings(environ: dict | None = None) -> ExecutorSettings:
    """BILLING_EXECUTOR (default in_process) and, for celery, BILLING_CELERY_BROKER and BILLING_CELERY_BACKEND.

    The result backend defaults to the broker when the broker is Redis (Redis keeps the results too), else
    to ``rpc://`` (results as messages over the broker). Every mistake is a SettingsError naming the
    variable and the fix, raised when the code location loads, before any run starts.
    """
    env = os.environ if environ is None else environ
    kind = env.get("BILLING_EXECUTOR", "").strip() or "in_process"
    if kind not in EXECUTORS:
        raise SettingsError(
            f"BILLING_EXECUTOR={kind!r} is not one of {', '.join(EXECUTORS)}; unset it for the default (in_process: every step in the run's process)"
        )
    if kind != "celery":
        return ExecutorSettings(kind)
    broker_fix = "set it to the Celery broker's URL, e.g. BILLING_CELERY_BROKER=redis://127.0.0.1:6379/0 (docs/scale-out.md)"
    broker = env.get("BILLING_CELERY_BROKER", "").strip()
    if not broker:
        raise SettingsError(f"BILLING_EXECUTOR=celery needs BILLING_CELERY_BROKER, which is not set; {broker_fix}")
    _check_url("BILLING_CELERY_BROKER", broker, CELERY_BROKER_SCHEMES, broker_fix)
    backend = env.get("BILLING_CELERY_BACKEND", "").strip()
    if backend:
        _check_url(
            "BILLING_CELERY_BACKEND",
            backend,
            None,
            "set it to the Celery result backend's URL, e.g. redis://127.0.0.1:6379/1, or unset it to keep results in a Redis broker",
        )
        return ExecutorSettings(kind, "BILLING_CELERY_BROKER", "BILLING_CELERY_BACKEND")
    if urlsplit(broker).scheme in ("redis", "rediss", "sentinel"):
        return ExecutorSettings(kind, "BILLING_CELERY_BROKER", "BILLING_CELERY_BROKER")
    return ExecutorSettings(kind, "BILLING_CELERY_BROKER", None)
