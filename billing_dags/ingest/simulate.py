"""Deterministic synthetic Prometheus samples for the five billing set-ups (seeds 000-004).

Determinism. No random-number state is kept between calls. Every choice is a hash of the seed
and a stable key: per-customer magnitudes hash (seed, customer label, name) with blake2b; per-day
and per-sample choices hash (seed, target, day number) or (series id, timestamp) with splitmix64
in numpy. A counter's value at time t is a closed form: the integral, floored, of a diurnal rate
``R * m(day) * (1 + A*cos(w*(t - peak)))`` since the counter's latest start (a restart, or the
birth of the series). Restarts are drawn per target (one exporter process) and day, and every
target also restarts once every 30 days, so the latest start before any t lies in the 30 days
before t. A day is therefore computed from a fixed window of its own: days simulated in any
order, or in parallel, give exactly the samples of a whole-month run, and the same
(seed, day, arguments) always gives identical tables.

Realism the pipeline must handle (all deterministic):

- counter resets: about 1 in 10 target-days a restart (random, p=0.07, plus the 30-day one)
  drops every counter of the target to ~0 at a random instant; it then climbs again;
- scrape gaps: about 1 in 15 target-days loses a contiguous 1-6 hour block of samples; the first
  missed scrape carries a Prometheus staleness marker;
- series born and stopped mid-month: some miners open a second pool connection (pool_host) on
  day 3 that ends on day 20; some namespaces replace a batch pod on day 10 (the old pod stops,
  a new pod with a new name is born); a stop is followed by one staleness marker;
- NaN samples: about 1 in 5000 samples is NaN;
- staleness markers: float64 NaN with bit pattern 0x7ff0000000000002 (``STALE_NAN_BITS``);
- an unknown customer: one series per day with client_id ``miner-unknown`` (no seeded customer);
- spikes and weekly patterns: a customer's daily rate varies (+-25%), some set-ups are quieter at
  weekends, and about 1 customer-day in 60 spikes 3-10x (for anomaly flags).

Samples lie on multiples of ``interval_s`` since the UTC epoch; timestamps are int64 ms.
Counters are integers (``container_cpu_usage_seconds_total`` is an integer ms counter / 1000),
gauges are integer-valued; all values stay far below 2**53.

Customers follow their ``usage_source`` (seeds/customers.csv): only ``prometheus`` customers get
samples. ``usage_events`` customers (LLM) get seed-003 rows from :func:`simulate_usage_events_rows`
and ``usage_reports`` customers (IoT) hourly seed-001 reports from :func:`simulate_usage_reports`;
:func:`write_simulated_usage_events` and :func:`accept_simulated_usage_reports` feed them through
the real paths (the PostgreSQL rows conversion; parse_report and the report store).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import numpy as np
import pyarrow as pa

from billing_dags.core.calendar import month_start, next_month, previous_month
from billing_dags.core.settings import Paths
from billing_dags.ingest import raw

SOURCE = "simulate"
#: Prometheus' staleness marker (value.StaleNaN): a NaN with this exact bit pattern
STALE_NAN_BITS = 0x7FF0000000000002
UNKNOWN_CLIENT_ID = "miner-unknown"
SETUPS = ("proxy", "iot", "testbed", "llm", "k8s")
LLM_MODELS = ("gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet", "llama-3.1-70b")
POOL_HOSTS = ("eu1.pool.example:3333", "us1.pool.example:3333", "asia1.pool.example:3333")
K8S_APPS = ("api", "mqtt", "postgres", "web", "worker")

DAY_S = 86_400
MONTH_S = 30 * DAY_S
GIB = 2**30
#: days of history a day's counters may depend on (the forced restart period)
WINDOW_DAYS = 30
P_RESET = 0.07
P_GAP = 1 / 15
P_NAN = 1 / 5000
P_SPIKE = 1 / 60
_W = 2 * math.pi / DAY_S
_CELLS_PER_CHUNK = 2_000_000

# salts for the per-day and per-sample hashes
_S_RESET, _S_RESET_T, _S_GAP, _S_GAP_LEN, _S_GAP_T, _S_DAY, _S_SPIKE, _S_SPIKE_X = range(1, 9)
_S_NAN, _S_NOISE = 101, 102


# --------------------------------------------------------------------------- hashing


def _key(*parts: object) -> int:
    """A stable unsigned 64-bit key of the parts."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big")


def _u(*parts: object) -> float:
    """A stable uniform number in [0, 1) from the parts."""
    return (_key(*parts) >> 11) / 2.0**53


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on a uint64 array (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _hash(keys: np.ndarray, values: np.ndarray, salt: int) -> np.ndarray:
    """Hash of (key, value, salt), broadcasting keys against values."""
    v = np.asarray(values).astype(np.uint64)
    with np.errstate(over="ignore"):
        v = v * np.uint64(0x9E3779B97F4A7C15) + np.uint64(salt)
    return _mix(np.asarray(keys, dtype=np.uint64) ^ _mix(v))


def _unit(h: np.ndarray) -> np.ndarray:
    """uint64 hashes to uniform floats in [0, 1)."""
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _lu(u: float, lo: float, hi: float) -> float:
    """Log-uniform between lo and hi for u in [0, 1)."""
    return lo * (hi / lo) ** u


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True, eq=False)
class _Spec:
    """One simulated series and the parameters of its closed form."""

    metric: str
    labels: dict[str, str]
    target: str  # the exporter process: restarts and scrape gaps hit all its series
    ckey: str  # the customer: daily multipliers are shared by all its series
    kind: str  # counter | counter_ms (integer ms, stored / 1000) | gauge | sawtooth
    rate: float  # counters: units per second on an average day; gauges: peak level
    amp: float = 0.3  # diurnal amplitude
    peak: float = 0.0  # second of day of the diurnal peak
    weekend: float = 1.0  # counters: rate factor on Saturdays and Sundays
    noise: float = 0.0  # gauges: +- jitter (units)
    lo: float = 0.0  # sawtooth: low point as a fraction of the peak
    period: float = 90.0 * DAY_S  # sawtooth: seconds between clean-ups
    phase: float = 0.0  # sawtooth: offset in seconds
    born_ms: int | None = None
    stop_ms: int | None = None


def _at(day: date, u: float, lo_h: float, hi_h: float) -> int:
    """Epoch ms of a whole second between lo_h and hi_h hours into ``day`` (UTC)."""
    start, _ = raw.day_bounds_ms(day)
    return start + int((lo_h + (hi_h - lo_h) * u) * 3600) * 1000


def _proxy(c: dict, seed: int, day: date) -> list[_Spec]:
    lv = c["label_value"]
    u = lambda name: _u(seed, "proxy", lv, name)  # noqa: E731
    ck = f"proxy/{lv}"
    gib = _lu(u("bytes"), 2, 40) * GIB
    shares = _lu(u("shares"), 20_000, 200_000)
    sent = 0.3 + 0.4 * u("sent")
    rej = 0.005 + 0.025 * u("rejected")
    conns = 1 + int(5 * u("connections"))
    amp, peak = 0.1 + 0.2 * u("amp"), DAY_S * u("peak")
    pool = int(len(POOL_HOSTS) * u("pool"))

    def conn(pool_host: str, share: float, level: int, **life) -> list[_Spec]:
        labels = {"client_id": lv, "pool_host": pool_host}
        per_s = share / MONTH_S
        common = dict(labels=labels, target=ck, ckey=ck, amp=amp, peak=peak, **life)
        return [
            _Spec("stratum_bytes_sent_total", kind="counter", rate=gib * sent * per_s, **common),
            _Spec("stratum_bytes_received_total", kind="counter", rate=gib * (1 - sent) * per_s, **common),
            _Spec("stratum_accepted_shares_total", kind="counter", rate=shares * per_s, **common),
            _Spec("stratum_rejected_shares_total", kind="counter", rate=shares * rej * per_s, **common),
            _Spec("stratum_submits_total", kind="counter", rate=shares * (1 + rej) * 1.01 * per_s, **common),
            _Spec("stratum_active_connections", kind="gauge", rate=level, noise=0.6, **common),
        ]

    specs = conn(POOL_HOSTS[pool], 1.0, conns)
    if u("backup") < 0.4:  # a second pool connection, day 3 to day 20 of every month
        ym = f"{day:%Y-%m}"
        born = _at(day.replace(day=3), _u(seed, "proxy", lv, "born", ym), 6, 18)
        stop = _at(day.replace(day=20), _u(seed, "proxy", lv, "stop", ym), 6, 18)
        share = 0.2 + 0.3 * u("backup-share")
        specs += conn(POOL_HOSTS[(pool + 1) % len(POOL_HOSTS)], share, max(1, conns // 2), born_ms=born, stop_ms=stop)
    return specs


def _unknown(seed: int) -> list[_Spec]:
    ck = f"proxy/{UNKNOWN_CLIENT_ID}"
    labels = {"client_id": UNKNOWN_CLIENT_ID, "pool_host": POOL_HOSTS[0]}
    rate = _lu(_u(seed, ck, "bytes"), 0.5, 3) * GIB / MONTH_S
    return [_Spec("stratum_bytes_sent_total", labels, ck, ck, "counter", rate, amp=0.2, peak=DAY_S * _u(seed, ck, "peak"))]


def _iot(c: dict, seed: int, day: date) -> list[_Spec]:
    lv = c["label_value"]
    u = lambda name: _u(seed, "iot", lv, name)  # noqa: E731
    ck = f"iot/{lv}"
    labels = {"customer_id": lv}
    traffic = _lu(u("traffic"), 5, 150) * GIB
    mqtt = traffic * (0.7 + 0.25 * u("mqtt"))
    http = traffic - mqtt
    mq_sent, http_sent = 0.3 + 0.4 * u("mqtt-sent"), 0.2 + 0.4 * u("http-sent")
    msg_size = _lu(u("msg-size"), 200, 2000)
    requests = _lu(u("requests"), 10_000, 1_000_000)
    devices = round(_lu(u("devices"), 3, 70))
    storage = _lu(u("storage"), 1, 60) * GIB
    common = dict(labels=labels, target=ck, ckey=ck, amp=0.2 + 0.3 * u("amp"), peak=DAY_S * u("peak"))
    per_s = 1 / MONTH_S
    return [
        _Spec("iot_mqtt_messages_total", kind="counter", rate=mqtt / msg_size * per_s, **common),
        _Spec("iot_mqtt_bytes_sent_total", kind="counter", rate=mqtt * mq_sent * per_s, **common),
        _Spec("iot_mqtt_bytes_received_total", kind="counter", rate=mqtt * (1 - mq_sent) * per_s, **common),
        _Spec("iot_http_requests_total", kind="counter", rate=requests * per_s, weekend=0.7, **common),
        _Spec("iot_http_bytes_sent_total", kind="counter", rate=http * http_sent * per_s, weekend=0.7, **common),
        _Spec("iot_http_bytes_received_total", kind="counter", rate=http * (1 - http_sent) * per_s, weekend=0.7, **common),
        _Spec(
            "iot_storage_used_bytes",
            kind="sawtooth",
            rate=storage,
            lo=0.6,
            period=90.0 * DAY_S,
            phase=90.0 * DAY_S * u("storage-phase"),
            noise=1e-5 * storage,
            **common,
        ),
        _Spec("iot_active_devices", kind="gauge", rate=devices, noise=1.0, **common),
    ]


def _testbed(c: dict, seed: int, day: date) -> list[_Spec]:
    lv = c["label_value"]
    u = lambda name: _u(seed, "testbed", lv, name)  # noqa: E731
    ck = f"testbed/{lv}"
    cpu_ms = _lu(u("cpu"), 0.5, 10) * 3_600_000
    net = _lu(u("network"), 0.5, 30) * 1e9
    calls = _lu(u("api"), 5_000, 300_000)
    common = dict(labels={"tenant_id": lv}, target=ck, ckey=ck, kind="counter", weekend=0.5, amp=0.4 + 0.4 * u("amp"), peak=DAY_S * (0.4 + 0.3 * u("peak")))
    per_s = 1 / MONTH_S
    return [
        _Spec("pf_usage_cpu_ms", rate=cpu_ms * per_s, **common),
        _Spec("pf_usage_network_bytes", rate=net * per_s, **common),
        _Spec("pf_usage_api_calls", rate=calls * per_s, **common),
        _Spec("pf_usage_tool_executions", rate=calls * (0.05 + 0.25 * u("tools")) * per_s, **common),
        _Spec("pf_usage_data_retrievals", rate=calls * (0.02 + 0.13 * u("retrievals")) * per_s, **common),
    ]


def _llm(c: dict, seed: int, day: date) -> list[_Spec]:
    lv = c["label_value"]
    u = lambda name: _u(seed, "llm", lv, name)  # noqa: E731
    ck = f"llm/{lv}"
    models = sorted(LLM_MODELS, key=lambda m: u(f"model/{m}"))[: 1 + int(3 * u("models"))]
    weights = [0.2 + u(f"weight/{m}") for m in models]
    total = _lu(u("tokens"), 1e6, 200e6)
    out = 0.15 + 0.45 * u("output")
    amp, peak = 0.5 + 0.4 * u("amp"), DAY_S * (0.4 + 0.3 * u("peak"))
    specs = []
    for m, w in zip(models, weights):
        tokens = total * w / sum(weights) / MONTH_S
        common = dict(labels={"api_key_hash": lv, "model": m}, target=ck, ckey=ck, kind="counter", weekend=0.6, amp=amp, peak=peak)
        specs.append(_Spec("llm_tokens_input_total", rate=tokens * (1 - out), **common))
        specs.append(_Spec("llm_tokens_output_total", rate=tokens * out, **common))
    return specs


def _pod_name(app: str, *parts: object) -> str:
    h = _key("pod", app, *parts)
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    suffix = "".join(alphabet[(h >> (5 * i)) % len(alphabet)] for i in range(5))
    return f"{app}-{(h >> 24) & 0xFFFFFFFFFF:010x}-{suffix}"


def _k8s(c: dict, seed: int, day: date) -> list[_Spec]:
    ns = c["label_value"]
    u = lambda name: _u(seed, "k8s", ns, name)  # noqa: E731
    ck = f"k8s/{ns}"
    cpu_ms = _lu(u("cpu"), 300, 4000) * 3600 * 1000  # core-hours -> ms
    mem = _lu(u("memory"), 500, 8000) / 720 * GIB  # GiB-hours -> average bytes
    net = _lu(u("network"), 50, 900) * GIB
    tx = 0.3 + 0.4 * u("tx")
    storage = _lu(u("storage"), 5, 80) * GIB
    requests = _lu(u("requests"), 1e6, 30e6)
    amp, peak = 0.2 + 0.4 * u("amp"), DAY_S * u("peak")
    apps = sorted(K8S_APPS, key=lambda a: u(f"app/{a}"))[: 2 + int(2 * u("pods"))]
    pods = [(_pod_name(a, ns), 0.5 + u(f"weight/{a}"), {}) for a in apps]
    total_w = sum(w for _, w, _ in pods)
    pods = [(p, w / total_w, life) for p, w, life in pods]
    if u("batch") < 0.5:  # a batch pod replaced on day 10 of every month (rolling)
        share = 0.1 + 0.2 * u("batch-share")
        this, prev, nxt = month_start(day), previous_month(day), next_month(day)
        born = {m: _at(m.replace(day=10), _u(seed, "k8s", ns, "batch-born", f"{m:%Y-%m}"), 2, 20) for m in (prev, this, nxt)}
        pods.append((_pod_name("batch", ns, f"{prev:%Y-%m}"), share, dict(born_ms=born[prev], stop_ms=born[this])))
        pods.append((_pod_name("batch", ns, f"{this:%Y-%m}"), share, dict(born_ms=born[this], stop_ms=born[nxt])))
    specs = []
    for pod, w, life in pods:
        common = dict(labels={"namespace": ns, "pod": pod}, target=f"{ck}/{pod}", ckey=ck, amp=amp, peak=peak, **life)
        specs += [
            _Spec("container_network_transmit_bytes_total", kind="counter", rate=net * tx * w / MONTH_S, **common),
            _Spec("container_network_receive_bytes_total", kind="counter", rate=net * (1 - tx) * w / MONTH_S, **common),
            _Spec("container_cpu_usage_seconds_total", kind="counter_ms", rate=cpu_ms * w / MONTH_S, **common),
            _Spec("container_memory_working_set_bytes", kind="gauge", rate=mem * w / (1 - 0.15 / 2), noise=0.02 * mem * w, **{**common, "amp": 0.15}),
        ]
    specs.append(
        _Spec(
            "kubelet_volume_stats_used_bytes",
            {"namespace": ns, "persistentvolumeclaim": "data-postgres-0"},
            f"{ck}/kubelet",
            ck,
            "sawtooth",
            storage,
            amp=0.0,
            lo=0.7,
            period=120.0 * DAY_S,
            phase=120.0 * DAY_S * u("storage-phase"),
            noise=1e-5 * storage,
        )
    )
    specs.append(
        _Spec(
            "nginx_ingress_controller_requests",
            {"namespace": ns, "ingress": f"{ns}-ingress"},
            f"{ck}/ingress",
            ck,
            "counter",
            requests / MONTH_S,
            amp=amp,
            peak=peak,
            weekend=0.8,
        )
    )
    return specs


PROFILES: dict[str, Callable[[dict, int, date], list[_Spec]]] = {
    "proxy": _proxy,
    "iot": _iot,
    "testbed": _testbed,
    "llm": _llm,
    "k8s": _k8s,
}


# --------------------------------------------------------------------------- validation


def _check_interval(interval_s: object) -> int:
    if isinstance(interval_s, bool) or not isinstance(interval_s, (int, np.integer)) or not 1 <= interval_s <= 3600:
        raise ValueError(f"interval_s={interval_s!r} is not a scrape interval; pass a whole number of seconds between 1 and 3600 (e.g. interval_s=60)")
    return int(interval_s)


def _check_day(day: object, name: str = "day") -> date:
    if isinstance(day, datetime):
        day = day.date()
    if not isinstance(day, date):
        raise ValueError(f"{name}={day!r} is not a date; pass a datetime.date such as date(2024, 5, 1)")
    return day


def _customer_rows(customers: pa.Table, n_customers: int | None) -> list[dict]:
    if not isinstance(customers, pa.Table):
        raise ValueError("customers must be a pyarrow Table; pass load_seeds(seeds_dir)['customers']")
    missing = {"customer_id", "setup", "label_value"} - set(customers.column_names)
    if missing:
        raise ValueError(f"customers table lacks column(s) {', '.join(sorted(missing))}; pass load_seeds(seeds_dir)['customers']")
    available = customers.num_rows
    if n_customers is not None:
        if isinstance(n_customers, bool) or not isinstance(n_customers, (int, np.integer)) or not 1 <= n_customers <= available:
            raise ValueError(
                f"n_customers={n_customers!r} is out of range: the customers table has {available} rows; "
                f"pass a number from 1 to {available}, or n_customers=None for all"
            )
        customers = customers.slice(0, int(n_customers))
    rows = customers.select(["customer_id", "setup", "label_value"]).to_pylist()
    sources = customers["usage_source"].to_pylist() if "usage_source" in customers.column_names else [None] * len(rows)
    for i, (r, source) in enumerate(zip(rows, sources)):
        r["usage_source"] = source or "prometheus"
        if r["setup"] not in PROFILES:
            raise ValueError(f"customers row {i} ({r['customer_id']!r}) has setup {r['setup']!r}; use one of {', '.join(SETUPS)}")
        if r["label_value"] == UNKNOWN_CLIENT_ID:
            raise ValueError(f"customers row {i} uses label_value {UNKNOWN_CLIENT_ID!r}, reserved for the unknown customer; rename it")
    return rows


# --------------------------------------------------------------------------- rendering


def _day_specs(day: date, rows: list[dict], seed: int) -> list[_Spec]:
    # customers billed from usage events or usage reports expose no Prometheus series
    specs = [s for r in rows if r["usage_source"] == "prometheus" for s in PROFILES[r["setup"]](r, seed, day)]
    return specs + _unknown(seed)


def _grid_ceil(ms: np.ndarray | int, iv_ms: int):
    return -(-np.asarray(ms, dtype=np.int64) // iv_ms) * iv_ms


def _render(day: date, specs: list[_Spec], seed: int, interval_s: int) -> tuple[pa.Table, pa.Table]:
    start_ms, end_ms = raw.day_bounds_ms(day)
    iv_ms = interval_s * 1000
    ts = np.arange(int(_grid_ceil(start_ms, iv_ms)), end_ms, iv_ms, dtype=np.int64)
    sod = (ts - start_ms) / 1000.0  # seconds of day
    dnum = start_ms // raw.DAY_MS
    inf = np.inf

    # keep series alive for part of the day (or whose staleness marker falls in it)
    def in_day(s: _Spec) -> bool:
        if s.born_ms is not None and s.born_ms >= end_ms:
            return False
        return s.stop_ms is None or int(_grid_ceil(s.stop_ms, iv_ms)) >= start_ms

    specs = [s for s in specs if in_day(s)]
    sids = [raw.series_id(s.metric, s.labels) for s in specs]
    first: dict[int, tuple[str, raw.Labels]] = {}
    for s, sid in zip(specs, sids):
        key = (s.metric, tuple(sorted(s.labels.items())))
        other = first.setdefault(sid, key)
        if other != key:  # two label sets with one id: refused, never merged
            raise raw.SeriesCollision([raw.Collision(sid, *key, *other, "the same simulated day")], f"simulated series for {day}")
    if len(first) != len(sids):
        raise ValueError("two simulated series have the same labels; give every customer a distinct label_value")
    order = sorted(range(len(specs)), key=lambda i: sids[i])
    specs = [specs[i] for i in order]
    sid = np.array([sids[i] for i in order], dtype=np.int64)
    sid_u = sid.view(np.uint64)
    n = len(specs)

    f = lambda attr: np.array([getattr(s, attr) for s in specs], dtype=np.float64)  # noqa: E731
    rate, amp, peak, weekend, noise = f("rate"), f("amp"), f("peak"), f("weekend"), f("noise")
    lo, period, phase = f("lo"), f("period"), f("phase")
    kind = np.array([s.kind for s in specs])
    is_counter = np.isin(kind, ["counter", "counter_ms"])
    born_sod = np.array([(s.born_ms - start_ms) / 1000 if s.born_ms is not None else -inf for s in specs])
    stop_sod = np.array([(s.stop_ms - start_ms) / 1000 if s.stop_ms is not None else inf for s in specs])
    stop_mark_ms = np.array([_grid_ceil(s.stop_ms, iv_ms) if s.stop_ms is not None else -1 for s in specs], dtype=np.int64)
    target_key = np.array([_key(seed, "target", s.target) for s in specs], dtype=np.uint64)
    cust_key = np.array([_key(seed, "customer", s.ckey) for s in specs], dtype=np.uint64)

    # restarts on the window's days dnum-30 .. dnum (index j; day j starts at j*DAY_S in window time)
    days = dnum - WINDOW_DAYS + np.arange(WINDOW_DAYS + 1, dtype=np.int64)
    tk, dd = target_key[:, None], days[None, :]
    forced = (dd + (tk % np.uint64(WINDOW_DAYS)).astype(np.int64)) % WINDOW_DAYS == 0
    reset = forced | (_unit(_hash(tk, dd, _S_RESET)) < P_RESET)
    reset_at = np.floor(_unit(_hash(tk, dd, _S_RESET_T)) * DAY_S) + np.arange(WINDOW_DAYS + 1) * DAY_S
    reset_at = np.where(reset, reset_at, -inf)
    prev_reset = reset_at[:, :WINDOW_DAYS].max(axis=1)  # always finite: one forced restart per 30 days
    today_reset = np.where(reset[:, WINDOW_DAYS], reset_at[:, WINDOW_DAYS], inf)
    born_w = born_sod + WINDOW_DAYS * DAY_S  # window time
    origin_prev = np.maximum(prev_reset, born_w)
    origin_today = np.where(np.isfinite(today_reset), np.maximum(today_reset, born_w), inf)

    # daily multipliers of the customer: +-25%, weekend factor, rare spikes
    ck, weekday = cust_key[:, None], (dd + 3) % 7  # 1970-01-01 was a Thursday
    m = 0.75 + 0.5 * _unit(_hash(ck, dd, _S_DAY))
    m = m * np.where(weekday >= 5, weekend[:, None], 1.0)
    spike = _unit(_hash(ck, dd, _S_SPIKE)) < P_SPIKE
    m = m * np.where(spike, 3 + 7 * _unit(_hash(ck, dd, _S_SPIKE_X)), 1.0)
    cum_m = np.concatenate([np.zeros((n, 1)), np.cumsum(m, axis=1)[:, :-1]], axis=1)

    def integral(rows: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Integral of the rate from the window start to window time x (per row)."""
        x = np.where(np.isfinite(x), x, 0.0)
        k = np.clip((x // DAY_S).astype(np.int64), 0, WINDOW_DAYS)
        s = x - k * DAY_S
        r, a, p = rate[rows], amp[rows], peak[rows]
        part = s + (a / _W) * (np.sin(_W * (s - p)) + np.sin(_W * p))
        return r * (cum_m[rows, k] * DAY_S + m[rows, k] * part)

    # scrape gaps of the day, per target
    gap = _unit(_hash(target_key, dnum, _S_GAP)) < P_GAP
    gap_len = np.floor(3600 + 5 * 3600 * _unit(_hash(target_key, dnum, _S_GAP_LEN)))
    gap_start = np.where(gap, np.floor(_unit(_hash(target_key, dnum, _S_GAP_T)) * (DAY_S - gap_len)), inf)
    gap_end = gap_start + gap_len

    ts_u = ts.astype(np.uint64)
    out_v, out_keep, counts, first = [], [], np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    chunk = max(1, _CELLS_PER_CHUNK // max(1, len(ts)))
    for lo_i in range(0, n, chunk):
        rows = np.arange(lo_i, min(n, lo_i + chunk))
        S = sod[None, :]
        col = lambda a, rows=rows: a[rows][:, None]  # noqa: E731

        # counters: floor(integral since the latest start)
        t_int = integral(rows[:, None], WINDOW_DAYS * DAY_S + np.broadcast_to(S, (len(rows), len(ts))))
        o_prev = integral(rows, origin_prev[rows])[:, None]
        o_today = integral(rows, origin_today[rows])[:, None]
        use_today = col(origin_today) <= (WINDOW_DAYS * DAY_S + S)
        counter = np.floor(np.maximum(t_int - np.where(use_today, o_today, o_prev), 0.0))
        counter = np.where(col(kind) == "counter_ms", counter / 1000.0, counter)

        # gauges: diurnal level with jitter, or a slowly growing sawtooth
        jitter = (2 * _unit(_hash(col(sid_u), ts_u[None, :], _S_NOISE)) - 1) * col(noise)
        diurnal = col(rate) * (1 - col(amp) * 0.5 * (1 - np.cos(_W * (S - col(peak)))))
        frac = np.mod((start_ms / 1000 + S) + col(phase), col(period)) / col(period)
        saw = col(rate) * (col(lo) + (1 - col(lo)) * frac)
        gauge = np.maximum(np.rint(np.where(col(kind) == "sawtooth", saw, diurnal) + jitter), 0.0)
        vals = np.where(col(is_counter), counter, gauge)

        # lifetime, gaps, staleness markers, NaNs
        alive = (col(born_sod) <= S) & (col(stop_sod) > S)
        in_gap = (col(gap_start) <= S) & (col(gap_end) > S)
        gi = np.searchsorted(sod, gap_start[rows])  # first missed scrape of the gap
        gap_mark = (np.arange(len(ts))[None, :] == gi[:, None]) & in_gap & alive
        stop_mark = (ts[None, :] == col(stop_mark_ms)) & ~in_gap
        mark = gap_mark | stop_mark
        keep = (alive & ~in_gap) | mark
        nan = keep & ~mark & (_unit(_hash(col(sid_u), ts_u[None, :], _S_NAN)) < P_NAN)
        vals[nan] = np.nan
        vals.view(np.uint64)[mark] = np.uint64(STALE_NAN_BITS)

        counts[rows] = keep.sum(axis=1)
        first[rows] = ts[np.argmax(keep, axis=1)]
        out_v.append(vals[keep])
        out_keep.append(keep)

    values = np.concatenate(out_v) if out_v else np.zeros(0)
    ts_col = np.concatenate([np.broadcast_to(ts, k.shape)[k] for k in out_keep]) if out_keep else np.zeros(0, np.int64)
    samples = pa.table(
        [pa.array(np.repeat(sid, counts)), pa.array(ts_col, pa.int64()), pa.array(values, pa.float64())],
        schema=raw.SAMPLES_SCHEMA,
    )
    present = counts > 0
    series = pa.table(
        [
            pa.array(sid[present]),
            pa.array([s.metric for s, p in zip(specs, present) if p], pa.string()),
            pa.array([sorted(s.labels.items()) for s, p in zip(specs, present) if p], pa.map_(pa.string(), pa.string())),
            pa.array(first[present]),
        ],
        schema=raw.SERIES_SCHEMA,
    )
    return samples, series


# --------------------------------------------------------------------------- public API


def simulate_day(
    day: date,
    customers: pa.Table,
    *,
    seed: int = 42,
    interval_s: int = 60,
    n_customers: int | None = None,
) -> tuple[pa.Table, pa.Table]:
    """(samples, series) of one UTC day for the customers (first ``n_customers`` rows), plus the unknown one."""
    day = _check_day(day)
    interval_s = _check_interval(interval_s)
    rows = _customer_rows(customers, n_customers)
    return _render(day, _day_specs(day, rows, int(seed)), int(seed), interval_s)


def write_simulated_day(
    paths: Paths,
    day: date,
    customers: pa.Table,
    *,
    seed: int = 42,
    interval_s: int = 60,
    n_customers: int | None = None,
) -> dict:
    """Simulate one day and replace its raw partition (source ``simulate``); returns write_day's figures."""
    samples, series = simulate_day(day, customers, seed=seed, interval_s=interval_s, n_customers=n_customers)
    return raw.write_day(paths, _check_day(day), samples, series, source=SOURCE)


def simulate_month(
    paths: Paths,
    month: date,
    customers: pa.Table,
    *,
    seed: int = 42,
    interval_s: int = 60,
    n_customers: int | None = None,
    progress: Callable[[date], object] | None = None,
) -> dict:
    """Write every day of ``month`` (its first day); returns totals: samples, series (distinct), bytes, days."""
    month = _check_day(month, "month")
    if month.day != 1:
        raise ValueError(f"month={month.isoformat()} is not the first day of a month; pass {month_start(month)!r}")
    _check_interval(interval_s)
    _customer_rows(customers, n_customers)
    nxt = next_month(month)
    totals = {"samples": 0, "series": 0, "series_days": 0, "bytes": 0, "days": 0}
    seen: set[int] = set()
    day = month
    while day < nxt:
        samples, series = simulate_day(day, customers, seed=seed, interval_s=interval_s, n_customers=n_customers)
        figures = raw.write_day(paths, day, samples, series, source=SOURCE)
        seen.update(series["series_id"].to_pylist())
        totals["samples"] += figures["samples"]
        totals["series_days"] += figures["series"]
        totals["bytes"] += figures["bytes"]
        totals["days"] += 1
        if progress is not None:
            progress(day)
        day += timedelta(days=1)
    totals["series"] = len(seen)
    return totals


# --------------------------------------------------------------------------- usage events and usage reports
#
# Customers whose usage_source is not ``prometheus`` have no series: an LLM customer billed from
# ``usage_events`` gets seed-003 rows (one per API request), an IoT customer billed from
# ``usage_reports`` gets seed-001 hourly reports. Both are deterministic per (seed, customer, day)
# (a local random.Random seeded from blake2b, or a hash per hour) and a day depends on nothing else.

#: the provider of each simulated model (seed 003's ``provider`` column)
LLM_PROVIDERS = {"gpt-4o": "openai", "gpt-4o-mini": "openai", "claude-3-5-sonnet": "anthropic", "llama-3.1-70b": "together"}
#: share of usage_events rows that failed (tokens spent upstream, never billed)
P_FAILED = 0.03
#: usage_events ids are ``days since epoch * ID_BLOCK + n``: unique across days, increasing in time
ID_BLOCK = 10_000_000
REPORT_INTERVAL_S = 3600
#: storage and registered devices grow from this day (a closed form of time, like the counters)
_GROWTH_ANCHOR = date(2024, 1, 1)
_CENT = Decimal("0.01")


def _source_rows(customers: pa.Table, n_customers: int | None, source: str, setup: str) -> list[dict]:
    """The first ``n_customers`` customers whose usage_source is ``source`` (they must be of ``setup``)."""
    picked = []
    for i, r in enumerate(_customer_rows(customers, n_customers)):
        if r["usage_source"] != source:
            continue
        if r["setup"] != setup:
            raise ValueError(
                f"customers row {i} ({r['customer_id']!r}) has usage_source {source!r} but setup {r['setup']!r}; "
                f"the simulator makes {source} for the {setup} set-up only: set its usage_source to prometheus "
                f"or its setup to {setup}"
            )
        picked.append(r)
    return picked


def _normal(rng: random.Random) -> float:
    """A standard normal number from two rng.random() draws (Box-Muller; random() is the stable stream)."""
    return math.sqrt(-2.0 * math.log(1.0 - rng.random())) * math.cos(2 * math.pi * rng.random())


def _llm_requests(c: dict, seed: int, day: date) -> list[dict]:
    lv = c["label_value"]
    u = lambda name: _u(seed, "usage_events", lv, name)  # noqa: E731
    models = sorted(LLM_MODELS, key=lambda m: u(f"model/{m}"))[: 2 + int(3 * u("models"))]
    weights = [0.2 + u(f"weight/{m}") for m in models]
    per_day = _lu(u("requests"), 400, 3000)
    prompt, completion = _lu(u("prompt"), 300, 3000), _lu(u("completion"), 80, 800)
    amp, peak = 0.5 + 0.4 * u("amp"), DAY_S * (0.4 + 0.3 * u("peak"))
    m = 0.75 + 0.5 * _u(seed, "usage_events", lv, "day", day.isoformat())
    if day.weekday() >= 5:
        m *= 0.6
    rng = random.Random(_key(seed, "usage_events", lv, day.isoformat()))
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    rows = []
    for _ in range(round(per_day * m)):
        while True:  # a diurnal time of day (rejection sampling)
            ms = int(rng.random() * DAY_S * 1000)
            if rng.random() * (1 + amp) < 1 + amp * math.cos(_W * (ms / 1000 - peak)):
                break
        model = rng.choices(models, weights)[0]
        tokens_in = max(1, int(prompt * math.exp(0.8 * _normal(rng))))
        tokens_out = max(1, int(completion * math.exp(0.7 * _normal(rng))))
        failed = rng.random() < P_FAILED
        rows.append(
            {
                "api_key_hash": lv,
                "tokens_input": tokens_in,
                "tokens_output": 0 if failed else tokens_out,
                "provider": LLM_PROVIDERS[model],
                "model": model,
                "status": "failed" if failed else "success",
                "created_at": start + timedelta(milliseconds=ms),
            }
        )
    return rows


def simulate_usage_events_rows(day: date, customers: pa.Table, *, seed: int = 42, n_customers: int | None = None) -> list[dict]:
    """Seed-003 usage_events rows of one UTC day for the customers (first ``n_customers``) whose usage_source is usage_events.

    One row per API request: id, api_key_hash (the customer's label_value), tokens_input,
    tokens_output, provider, model, status ('success', or 'failed': never billed) and created_at
    (a UTC datetime inside the day, whole milliseconds), ordered by created_at like a bigserial.
    """
    day = _check_day(day)
    rows = [r for c in _source_rows(customers, n_customers, "usage_events", "llm") for r in _llm_requests(c, int(seed), day)]
    rows.sort(key=lambda r: (r["created_at"], r["api_key_hash"], r["model"], r["tokens_input"], r["tokens_output"]))
    if len(rows) >= ID_BLOCK:
        raise ValueError(f"{len(rows):,} simulated usage_events rows on {day}: at most {ID_BLOCK - 1:,}; pass fewer customers")
    base = (day - date(1970, 1, 1)).days * ID_BLOCK
    return [{"id": base + i + 1, **r} for i, r in enumerate(rows)]


def _hourly(seed: int, lv: str, name: str, hour: int) -> float:
    return _u(seed, "usage_reports", lv, name, hour)


def _iot_report(c: dict, seed: int, day: date, hour: int) -> dict:
    """The report an instance sends at ``hour`` (hours since the epoch): usage of the hour before it."""
    lv = c["label_value"]
    u = lambda name: _u(seed, "usage_reports", lv, name)  # noqa: E731
    h = lambda name: _hourly(seed, lv, name, hour)  # noqa: E731
    t_s = hour * 3600
    # counters: the hour [t - 1h, t), a diurnal rate and a daily multiplier of the hour's day
    mid = t_s - 1800
    mid_day = datetime.fromtimestamp(mid, UTC).date()
    amp, peak = 0.2 + 0.3 * u("amp"), DAY_S * u("peak")
    f = (1 + amp * math.cos(_W * (mid % DAY_S - peak))) * (0.75 + 0.5 * _u(seed, "usage_reports", lv, "day", mid_day.isoformat()))
    weekend = 0.7 if mid_day.weekday() >= 5 else 1.0
    per_hour = 1 / 720  # a 30-day month
    traffic = _lu(u("traffic"), 5, 150) * GIB * per_hour * f
    mqtt = traffic * (0.7 + 0.25 * u("mqtt"))
    http = (traffic - mqtt) * weekend
    mq_sent, http_sent = 0.3 + 0.4 * u("mqtt-sent"), 0.2 + 0.4 * u("http-sent")
    msgs = mqtt / _lu(u("msg-size"), 200, 2000)
    published = 0.3 + 0.4 * u("published")
    requests = _lu(u("requests"), 10_000, 1_000_000) * per_hour * f * weekend
    n = lambda x, name: Decimal(int(x * (0.9 + 0.2 * h(name))))  # noqa: E731
    # gauges: levels at t; devices drift slowly (a 23-day wave) with +-1 of jitter; storage grows
    devices = _lu(u("devices"), 15, 120)
    wave = 1 + 0.12 * math.sin(2 * math.pi * (t_s / (23 * DAY_S) + u("devices-phase")))
    active = max(0, round(devices * wave + (2 * h("devices") - 1)))
    grown_days = max(0.0, t_s / DAY_S - (_GROWTH_ANCHOR - date(1970, 1, 1)).days)
    registered = max(active, round(devices * (1.15 + 0.1 * u("registered")) + grown_days / 90))
    mb = lambda name, lo, hi, glo, ghi: (  # noqa: E731
        Decimal(round((_lu(u(name), lo, hi) + _lu(u(name + "-growth"), glo, ghi) * grown_days) * 100)) * _CENT
    )
    report = {
        "report_id": f"{day.isoformat()}T{hour % 24:02d}:00Z",
        "customer_id": c["customer_id"],
        "reported_at": f"{day.isoformat()}T{hour % 24:02d}:00:00Z",
        "interval_seconds": Decimal(REPORT_INTERVAL_S),
        "active_devices": Decimal(active),
        "total_devices": Decimal(registered),
        "mqtt_messages_published": n(msgs * published, "published"),
        "mqtt_messages_received": n(msgs * (1 - published), "received"),
        "mqtt_bytes_sent": n(mqtt * mq_sent, "mqtt-sent"),
        "mqtt_bytes_received": n(mqtt * (1 - mq_sent), "mqtt-received"),
        "mqtt_connections": Decimal(active + int(3 * h("connections"))),
        "http_requests": n(requests, "requests"),
        "http_bytes_sent": n(http * http_sent, "http-sent"),
        "http_bytes_received": n(http * (1 - http_sent), "http-received"),
        "postgres_size_mb": mb("postgres", 200, 5000, 1, 15),
        "influxdb_size_mb": mb("influxdb", 1000, 20000, 5, 40),
        "influxdb_points": Decimal(registered * (10 + int(20 * u("points")))),
    }
    return report


def simulate_usage_reports(day: date, customers: pa.Table, *, seed: int = 42, n_customers: int | None = None) -> list[dict]:
    """Seed-001 usage reports of one UTC day for the customers (first ``n_customers``) whose usage_source is usage_reports.

    One report per customer at each HH:00 of the day, as the endpoint decodes it (numbers as
    Decimal): report_id ``YYYY-MM-DDTHH:00Z``, customer_id, reported_at (RFC 3339, Z),
    interval_seconds 3600 and every field of seeds/report_fields.csv: the counters are the whole
    units of the hour before reported_at, the gauges are levels at reported_at (storage in MB with
    two decimals, growing; devices drifting slowly).
    """
    day = _check_day(day)
    first_hour = (day - date(1970, 1, 1)).days * 24
    return [_iot_report(c, int(seed), day, first_hour + i) for c in _source_rows(customers, n_customers, "usage_reports", "iot") for i in range(24)]


def _usage_events_tuple(row: dict) -> tuple:
    """A simulated row in the shape the PostgreSQL query returns (id and numbers as text, created_at in ms)."""
    ms = (row["created_at"] - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    return (str(row["id"]), ms, row["api_key_hash"], row["model"], row["provider"], row["status"], str(row["tokens_input"]), str(row["tokens_output"]))


def write_simulated_usage_events(paths: Paths, day: date, customers: pa.Table, *, seed: int = 42, n_customers: int | None = None, cfg=None) -> dict:
    """Simulate the day's usage_events rows and write them as raw events (source ``simulate``) through
    the PostgreSQL path's conversion (:func:`billing_dags.ingest.postgres_events.rows_to_batch`)."""
    from billing_dags.ingest import events, postgres_events

    cfg = cfg or postgres_events.UsageEventsTable()
    rows = simulate_usage_events_rows(day, customers, seed=seed, n_customers=n_customers)
    batch = postgres_events.rows_to_batch([_usage_events_tuple(r) for r in rows], cfg)
    figures = events.write_events_day(paths, _check_day(day), batch, SOURCE)
    billable = set(cfg.billable_statuses)
    return {
        **figures,
        "rows": len(rows),
        "unbilled_rows": sum(r["status"] not in billable for r in rows),
        "customers": len({r["api_key_hash"] for r in rows}),
    }


def accept_simulated_usage_reports(paths: Paths, day: date, customers: pa.Table, *, seed: int = 42, n_customers: int | None = None, schema=None) -> dict:
    """Simulate the day's usage reports and accept them into the report store as the endpoint does
    (parse_report, then ReportStore.accept); returns {'reports', 'accepted', 'duplicate'}.

    A report is parsed as if received one second after its reported_at, so past days are accepted.
    Raises ReportError (a report the schema refuses) or ReportConflict (the store holds a different
    report under the same id, e.g. simulated with another seed).
    """
    from billing_dags.ingest import usage_reports as ur

    day = _check_day(day)
    schema = schema or ur.ReportSchema.from_seeds(paths.seeds_dir)
    docs = simulate_usage_reports(day, customers, seed=seed, n_customers=n_customers)
    counts = {"reports": len(docs), "accepted": 0, "duplicate": 0}
    if not docs:
        return counts
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    with ur.ReportStore.open(paths) as store:
        for doc in docs:
            reported_at = datetime.fromisoformat(doc["reported_at"].replace("Z", "+00:00"))
            received_ms = (reported_at - epoch) // timedelta(milliseconds=1) + 1000
            report = ur.parse_report(doc, schema, now_ms=received_ms, max_age_days=ur.DEFAULT_MAX_AGE_DAYS)
            counts[store.accept(report, now_ms=received_ms)] += 1
    return counts
