"""Worked pricing examples from the seed documents (reference/000-004), by hand.

Each test builds a fixture fct_usage_by_month for one customer, runs fct_rated_usage_by_subscription_period and
fct_invoice_lines with the real seeds, and compares the amounts with literal cents worked out
in the comment (never computed by the code under test). DESIGN rule 6 (explicit units: GiB is
2^30 bytes, GB/MB are powers of 10) and rule 7 (one half-up rounding per line) apply.
"""

from __future__ import annotations

import csv
import shutil
from decimal import Decimal

import pytest
import reference as ref
from sql_helpers import SEEDS_DIR, Runner, month_window, rate_month, seed_tables

GIB = 2**30
APRIL = month_window(2025, 4)  # 30 days
APRIL_MS = 30 * 86_400_000
assert APRIL.end_ms - APRIL.start_ms == APRIL_MS


def usage(customer_id, meter_id, *, kind="counter", dimension="", usage=None, peak=None, integral=None, covered_ms=None, window=APRIL):
    return dict(
        month=window.start,
        customer_id=customer_id,
        meter_id=meter_id,
        dimension=dimension,
        kind=kind,
        usage=usage,
        gauge_peak=peak,
        gauge_integral=integral,
        gauge_covered_ms=covered_ms,
        period_ms=window.end_ms - window.start_ms,
    )


_RUNNER: list[Runner] = []


@pytest.fixture(scope="module", autouse=True)
def _shared_runner():
    """One in-memory DuckDB with the real seeds for this module (each test replaces the month)."""
    with Runner() as r:
        _RUNNER.append(r)
        yield
        _RUNNER.clear()


def invoice(rows, customer_id, window=APRIL, seeds=None):
    """(rated rows, invoice lines) of one customer; checks grain and window on the way."""
    runner = _RUNNER[0] if seeds is None and _RUNNER else None
    rated, lines = rate_month(rows, window, seeds, runner=runner)
    rated = [r for r in rated if r["customer_id"] == customer_id]
    lines = [r for r in lines if r["customer_id"] == customer_id]
    assert all(r["month"] == window.start for r in rated + lines)
    assert sorted(r["line_number"] for r in lines) == list(range(1, len(lines) + 1))
    return rated, lines


def amounts(lines) -> dict:
    """line -> amount_minor, keyed by meter_id (usage lines) or line_type (base fee, risk)."""
    out = {}
    for r in lines:
        key = r["meter_id"] if r["line_type"] == "usage" else r["line_type"]
        if r["dimension"]:
            key = f"{key}/{r['dimension']}"
        assert key not in out, key
        out[key] = r["amount_minor"]
    return out


def nonzero(d: dict) -> dict:
    return {k: v for k, v in d.items() if v != 0}


# --- seed 000: mining proxy, hybrid plan ----------------------------------------------------------


def test_proxy_hybrid_plan():
    """mp-003 on proxy_hybrid: $5/month incl. 10 GiB + 10,000 shares; $0.05/GiB and $0.00005/share over.

    25 GiB and 50,000 accepted shares:
      base                                   $5.00 =  500 cents
      bytes:  (25 - 10) GiB x $0.05          $0.75 =   75 cents
      shares: (50,000 - 10,000) x $0.00005   $2.00 =  200 cents
      total                                  $7.75 =  775 cents
    """
    rows = [
        usage("mp-003", "proxy_bytes", usage=25 * GIB),
        usage("mp-003", "proxy_accepted_shares", usage=50_000),
    ]
    rated, lines = invoice(rows, "mp-003")
    assert amounts(lines) == {"base_fee": 500, "proxy_accepted_shares": 200, "proxy_bytes": 75}
    assert sum(r["amount_minor"] for r in lines) == 775
    by_meter = {r["meter_id"]: r for r in rated}
    assert by_meter["proxy_bytes"]["quantity"] == 25 and by_meter["proxy_bytes"]["billable_quantity"] == 15
    assert by_meter["proxy_bytes"]["unit"] == "gib"
    assert by_meter["proxy_accepted_shares"]["billable_quantity"] == 40_000
    # the independent reference agrees
    assert ref.price_minor(25 * GIB, Decimal("0.05"), included=10, divisor=GIB) == 75
    assert ref.price_minor(50_000, Decimal("0.00005"), included=10_000) == 200


def test_proxy_gib_is_not_gb():
    """Rule 6: 10 GB (10^10 bytes) on proxy_per_gb ($0.10 per GiB) is 9.3132257... GiB.

    10^10 / 2^30 = 9.31322574615478515625 GiB x $0.10 = $0.931322... -> 93 cents (not $1.00).
    """
    rated, lines = invoice([usage("mp-001", "proxy_bytes", usage=10**10)], "mp-001")
    assert amounts(lines) == {"proxy_bytes": 93}
    assert rated[0]["quantity"] == Decimal("9.313225746")


# --- seed 001: IoT Starter ----------------------------------------------------------------------

IOT_STARTER_ROWS = [
    usage("iot-001", "iot_devices", kind="gauge", peak=12),
    usage("iot-001", "iot_mqtt_bytes", usage=8 * GIB),
    usage("iot-001", "iot_http_bytes", usage=5 * GIB),
    usage("iot-001", "iot_http_requests", usage=2_500),
    usage("iot-001", "iot_storage", kind="gauge", peak=3 * GIB),
]


def test_iot_starter_overage():
    """iot-001 on IoT Starter: $29/month, 10 devices, 10 GiB traffic (MQTT + HTTP pooled), 5 GiB storage.

    base                                                         $29.00 = 2900 cents
    devices: peak 12, 10 included -> 2 x $2                       $4.00 =  400 cents
    traffic: MQTT 8 GiB + HTTP 5 GiB = 13 GiB against a pooled 10 GiB allowance,
             used by MQTT first (as the plan lists it): MQTT 8 GiB free; HTTP gets the
             remaining 2 GiB -> 3 GiB HTTP over x $0.15           $0.45 =   45 cents
             MQTT over: 0                                         $0.00 =    0 cents
    API calls: 2,500 at $0.50 per 1,000, partial packages round up:
             ceil(2,500 / 1,000) = 3 packages x $0.50             $1.50 =  150 cents
    storage: peak 3 GiB <= 5 GiB included                         $0.00 =    0 cents
    total                                                        $34.95 = 3495 cents
    """
    rated, lines = invoice(IOT_STARTER_ROWS, "iot-001")
    got = amounts(lines)
    by_meter = {r["meter_id"]: r for r in rated}
    assert by_meter["iot_http_requests"]["packages"] == 3
    assert got["base_fee"] == 2900
    assert got["iot_devices"] == 400
    assert got["iot_http_requests"] == 150
    assert got["iot_storage"] == 0
    assert (got["iot_mqtt_bytes"], got["iot_http_bytes"]) == (0, 45), (
        "pooled 10 GiB traffic allowance should be used by MQTT (8 GiB) first, leaving 3 GiB of HTTP "
        f"over at $0.15; got MQTT {got['iot_mqtt_bytes']} cents, HTTP {got['iot_http_bytes']} cents"
    )
    assert sum(got.values()) == 3495
    # reference: pooled allowance in the plan's order (MQTT, then HTTP)
    mqtt_over, http_over = ref.apply_allowance([Decimal(8), Decimal(5)], Decimal(10))
    assert (mqtt_over, http_over) == (0, 3)
    assert ref.price_minor(http_over, Decimal("0.15")) == 45
    assert ref.price_minor(2_500, Decimal("0.50"), package_size=1000) == 150


def test_iot_pooled_allowance_is_shared_once():
    """Whatever the order, the pool gives 10 GiB in total: 13 GiB of traffic -> 3 GiB billable."""
    rated, _ = invoice(IOT_STARTER_ROWS, "iot-001")
    traffic = [r for r in rated if r["meter_id"] in ("iot_mqtt_bytes", "iot_http_bytes")]
    assert sum(r["included_quantity"] for r in traffic) == 10
    assert sum(r["billable_quantity"] for r in traffic) == 3


def test_iot_api_call_packages_round_up():
    """$0.50 per 1,000 calls: 1,000 -> 1 package (50 cents); 1,001 -> 2 (100 cents); 0 -> 0."""
    for calls, cents in [(0, 0), (1, 50), (1_000, 50), (1_001, 100), (2_500, 150)]:
        _rated, lines = invoice([usage("iot-003", "iot_http_requests", usage=calls)], "iot-003")
        assert amounts(lines)["iot_http_requests"] == cents, calls


# --- seed 002: agent testbed, Professional with risk multiplier ------------------------------------


def test_testbed_professional_with_risk_multiplier():
    """tb-002 on Testbed Professional: $200/month, risk multiplier 0.9x.

    Quotas: CPU 2 h, network 5 GB (5,000 MB), API calls 50,000, tools 5,000, retrievals 2,500.
      base                                                       $200.00 = 20000 cents
      CPU: 3 h (10,800,000 ms) -> 1 h over x $0.288 = $0.288 -> 28.8 -> 29 cents
      network: 6,000 MB (6 x 10^9 bytes) -> 1,000 MB over x $0.04  $40.00 =  4000 cents
      API calls: 60,000 -> 10,000 over x $0.0008                    $8.00 =   800 cents
      tool executions: 5,100 -> 100 over x $0.008                   $0.80 =    80 cents
      data retrievals: 2,000 <= 2,500                               $0.00 =     0 cents
      subtotal (base + usage) = 20000 + 29 + 4000 + 800 + 80 = 24909 cents
      risk adjustment = 24909 x (0.9 - 1) = -2490.9 -> -2491 cents
      total = 24909 - 2491 = 22418 cents ($224.18)
    """
    rows = [
        usage("tb-002", "testbed_cpu", usage=10_800_000),
        usage("tb-002", "testbed_network", usage=6 * 10**9),
        usage("tb-002", "testbed_api_calls", usage=60_000),
        usage("tb-002", "testbed_tool_executions", usage=5_100),
        usage("tb-002", "testbed_data_retrievals", usage=2_000),
    ]
    _, lines = invoice(rows, "tb-002")
    assert amounts(lines) == {
        "base_fee": 20000,
        "testbed_api_calls": 800,
        "testbed_cpu": 29,
        "testbed_data_retrievals": 0,
        "testbed_network": 4000,
        "testbed_tool_executions": 80,
        "risk_adjustment": -2491,
    }
    assert sum(r["amount_minor"] for r in lines) == 22418
    risk = [r for r in lines if r["line_type"] == "risk_adjustment"]
    assert len(risk) == 1 and risk[0]["line_number"] == len(lines)  # the last line
    assert ref.risk_adjustment_minor(24909, Decimal("0.9")) == -2491


def test_testbed_basic_has_no_risk_line():
    """Testbed Basic (multiplier 1): no risk adjustment line. CPU 1.5 h -> 0.5 h x $0.36 = 18 cents."""
    _, lines = invoice([usage("tb-001", "testbed_cpu", usage=5_400_000)], "tb-001")
    assert nonzero(amounts(lines)) == {"base_fee": 5000, "testbed_cpu": 18}
    assert not [r for r in lines if r["line_type"] == "risk_adjustment"]


# --- seed 003: LLM API, per-model token prices ----------------------------------------------------

LLM_001 = "dba762d30bb922c294435ed9f0a9e1a3f638e96a796317d2ac728564afcca7ee"  # api_key_hash of llm-001


def test_llm_per_model_tokens():
    """llm-001 on pay-as-you-go, prices per 1M tokens, no base fee.

    gpt-4o input: 1,234,567 x $2.50 / 1M = $3.0864175 -> 308.64175 -> 309 cents
    gpt-4o output: 54,321 x $10.00 / 1M = $0.54321 -> 54.321 -> 54 cents
    claude-3-5-sonnet input: 2,000,000 x $3.00 / 1M = $6.00 = 600 cents
    gpt-4o-mini output: 10,000 x $0.60 / 1M = $0.006 -> 0.6 -> 1 cent
    total 309 + 54 + 600 + 1 = 964 cents
    """
    rows = [
        usage("llm-001", "llm_input_tokens", dimension="gpt-4o", usage=1_234_567),
        usage("llm-001", "llm_output_tokens", dimension="gpt-4o", usage=54_321),
        usage("llm-001", "llm_input_tokens", dimension="claude-3-5-sonnet", usage=2_000_000),
        usage("llm-001", "llm_output_tokens", dimension="gpt-4o-mini", usage=10_000),
    ]
    _, lines = invoice(rows, "llm-001")
    assert nonzero(amounts(lines)) == {
        "llm_input_tokens/gpt-4o": 309,
        "llm_output_tokens/gpt-4o": 54,
        "llm_input_tokens/claude-3-5-sonnet": 600,
        "llm_output_tokens/gpt-4o-mini": 1,
    }
    assert "base_fee" not in amounts(lines)
    assert sum(r["amount_minor"] for r in lines) == 964
    assert ref.price_minor(1_234_567, Decimal("2.50"), divisor=10**6) == 309


# --- seed 004: Kubernetes Starter -----------------------------------------------------------------


def test_k8s_starter():
    """k8s-001 on Kubernetes Starter in April (30 days = 720 h): $29/month; 720 core-hours,
    1,440 GiB-hours RAM, 10 GiB-months storage, 100 GiB network included.

      base                                                             $29.00 = 2900 cents
      CPU: 2,880,000 core-seconds = 800 core-hours -> 80 over x $0.05   $4.00 =  400 cents
      memory: 3 GiB held the whole month: integral 3 GiB x 720 h = 2,160 GiB-hours
              -> 720 over x $0.01                                       $7.20 =  720 cents
      storage: 40 GiB for 15 of 30 days = 20 GiB-months -> 10 over x $0.20  $2.00 = 200 cents
      network: 150 GiB -> 50 over x $0.10                               $5.00 =  500 cents
      HTTP requests: 2,500,000 at $0.50 per 1M -> 3 packages            $1.50 =  150 cents
      total                                                            $48.70 = 4870 cents
    """
    day_ms = 86_400_000
    rows = [
        usage("k8s-001", "k8s_cpu", usage=2_880_000),
        usage("k8s-001", "k8s_memory", kind="gauge", integral=3 * GIB * APRIL_MS, covered_ms=APRIL_MS, peak=3 * GIB),
        usage("k8s-001", "k8s_storage", kind="gauge", integral=40 * GIB * 15 * day_ms, covered_ms=15 * day_ms, peak=40 * GIB),
        usage("k8s-001", "k8s_network", usage=150 * GIB),
        usage("k8s-001", "k8s_http_requests", usage=2_500_000),
    ]
    rated, lines = invoice(rows, "k8s-001")
    assert amounts(lines) == {
        "base_fee": 2900,
        "k8s_cpu": 400,
        "k8s_http_requests": 150,
        "k8s_memory": 720,
        "k8s_network": 500,
        "k8s_storage": 200,
    }
    assert sum(r["amount_minor"] for r in lines) == 4870
    by_meter = {r["meter_id"]: r for r in rated}
    assert by_meter["k8s_memory"]["quantity"] == 2160 and by_meter["k8s_memory"]["unit"] == "gib-hour"
    assert by_meter["k8s_storage"]["quantity"] == 20 and by_meter["k8s_storage"]["unit"] == "gib-month"


def test_k8s_professional_large_storage_gauge():
    """k8s-002 on Kubernetes Professional: a 100 GiB volume held all April.

    integral = 100 x 2^30 bytes x 2,592,000,000 ms = 2.78e20 byte-ms; / period = 100 GiB-months
      storage: 100 - 50 included = 50 GiB-months x $0.20 = $10.00 = 1000 cents
      base $99.00 = 9900 cents; total 10900 cents
    """
    rows = [usage("k8s-002", "k8s_storage", kind="gauge", integral=100 * GIB * APRIL_MS, covered_ms=APRIL_MS, peak=100 * GIB)]
    _, lines = invoice(rows, "k8s-002")
    assert nonzero(amounts(lines)) == {"base_fee": 9900, "k8s_storage": 1000}


# --- rounding (rule 7) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("customer", "meter", "dimension", "quantity", "cents"),
    [
        # proxy_per_share: $0.0001 per share
        ("mp-002", "proxy_accepted_shares", "", 150, 2),  # $0.015 = 1.5 cents, exactly half -> 2
        ("mp-002", "proxy_accepted_shares", "", 149, 1),  # $0.0149 = 1.49 cents -> 1
        ("mp-002", "proxy_accepted_shares", "", 50, 1),  # $0.005 = 0.5 cents -> 1
        ("mp-002", "proxy_accepted_shares", "", 49, 0),  # $0.0049 = 0.49 cents -> 0
        # gpt-4o-mini input: $0.15 per 1M tokens
        ("llm-001", "llm_input_tokens", "gpt-4o-mini", 100_000, 2),  # $0.015 -> 2 cents
        ("llm-001", "llm_input_tokens", "gpt-4o-mini", 99_999, 1),  # $0.01499985 -> 1 cent
    ],
)
def test_half_cent_rounds_up_just_under_rounds_down(customer, meter, dimension, quantity, cents):
    _, lines = invoice([usage(customer, meter, dimension=dimension, usage=quantity)], customer)
    key = f"{meter}/{dimension}" if dimension else meter
    assert amounts(lines)[key] == cents


def test_rounding_is_once_per_line_not_per_day():
    """30 days of 50 shares each ($0.005 = half a cent per day) are one line of 1,500 shares:
    1,500 x $0.0001 = $0.15 = 15 cents (rounding each day would give 30 x 1 = 30 cents)."""
    _, lines = invoice([usage("mp-002", "proxy_accepted_shares", usage=30 * 50)], "mp-002")
    assert amounts(lines) == {"proxy_accepted_shares": 15}


def test_zero_minor_digit_currency_jpy(tmp_path):
    """A plan in yen (minor unit exponent 0): amounts are whole yen, half-up.

    jp_shares: base fee ¥1,000; ¥0.5 per accepted share.
      3 shares x ¥0.5 = ¥1.5 -> ¥2 (half rounds up); base ¥1000; total ¥1002.
    """
    seeds = tmp_path / "seeds"
    shutil.copytree(SEEDS_DIR, seeds)
    with (seeds / "plans.csv").open("a", newline="") as f:
        csv.writer(f).writerow(["jp_shares", 1, "2024-01-01", "JP shares", "proxy", "jpy", "1000", "0", "0", "1", "yen plan"])
    with (seeds / "prices.csv").open("a", newline="") as f:
        csv.writer(f).writerow(["jp_shares", 1, "proxy_accepted_shares", "", "0", "", "per_unit", "0.5", 1, "up", "¥0.5 per share"])
    with (seeds / "customers.csv").open("a", newline="") as f:
        csv.writer(f).writerow(["mp-jp", "Miner JP", "proxy", "miner-jp", "jpy", "", "prometheus"])
    with (seeds / "subscriptions.csv").open("a", newline="") as f:
        csv.writer(f).writerow(["mp-jp", "jp_shares", "2024-01-01", ""])
    tables = seed_tables(seeds)
    for shares, yen in [(3, 2), (5, 3), (1, 1), (4, 2)]:
        _, lines = invoice([usage("mp-jp", "proxy_accepted_shares", usage=shares)], "mp-jp", seeds=tables)
        assert {r["currency"] for r in lines} == {"jpy"}
        assert amounts(lines) == {"base_fee": 1000, "proxy_accepted_shares": yen}, shares
        assert ref.price_minor(shares, Decimal("0.5"), minor_unit_exponent=0) == yen
