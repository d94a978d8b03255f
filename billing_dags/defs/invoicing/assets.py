"""Invoices: one per customer and month, as JSON, CSV, HTML and PDF, drafts until the grace period ends."""

from datetime import UTC, datetime

import dagster as dg
import pyarrow.parquet as pq

from billing_dags.billing import build, settlement, store
from billing_dags.billing import credits as cr
from billing_dags.billing.manifest import code_version, invoice_manifest
from billing_dags.core.money import format_minor
from billing_dags.core.settings import DEFAULT_GRACE_DAYS
from billing_dags.defs.shared.partitions import SINGLE_RUN, billing_monthly, combined_check_result, materialize_each
from billing_dags.defs.shared.resources import WarehouseResource
from billing_dags.models.sqlmodels import load_project, partition_file, seed_snapshot_path
from billing_dags.operations.flags import month_flags, unacknowledged_critical
from billing_dags.seeds.catalog import SPECS, SeedError, load_grants


class InvoiceConfig(dg.Config):
    grace_days: int = DEFAULT_GRACE_DAYS
    #: ISO timestamp standing in for "now" (reruns, tests); empty means the wall clock
    as_of: str = ""


def invoice_now(config: InvoiceConfig) -> datetime:
    if not config.as_of:
        return datetime.now(UTC)
    try:
        now = datetime.fromisoformat(config.as_of)
    except ValueError:
        raise dg.Failure(f"as_of {config.as_of!r} is not an ISO timestamp; use e.g. 2026-11-04T00:00:00+00:00") from None
    return now if now.tzinfo else now.replace(tzinfo=UTC)


@dg.asset(
    partitions_def=billing_monthly,
    group_name="billing",
    kinds={"json", "html", "csv"},
    backfill_policy=SINGLE_RUN,
    # seeds/credits.csv is read at invoicing time (validated against the customer and currency snapshots);
    # it is a dependency too once seeds.SPECS has a "credits" entry (then seed_credits is an asset)
    deps=[
        "fct_invoice_lines",
        "fct_usage_by_month",
        "fct_anomaly_flags_by_day",
        "seed_customers",
        "seed_plans",
        "seed_currencies",
        "seed_subscriptions",
        *(["seed_credits"] if "credits" in SPECS else []),
        # what the document says besides its figures (issuer, bill-to, terms, tax rates, meter names), read at invoicing time
        "seed_issuer",
        "seed_customer_billing",
        "seed_tax_rates",
        "seed_meter_display",
    ],
    check_specs=[
        dg.AssetCheckSpec("total_equals_sum_of_lines", asset="invoices", blocking=True),
        dg.AssetCheckSpec(
            "every_customer_invoiced",
            asset="invoices",
            blocking=True,
            description="Every customer with a subscription or usage in the month has an invoice, or a flag naming "
            "why not (usage outside every subscription): nobody is left unbilled silently.",
        ),
        dg.AssetCheckSpec(
            "critical_flags_acknowledged",
            asset="invoices",
            description="No invoice is held in draft by an unacknowledged critical anomaly flag (billing flags ack).",
        ),
    ],
)
def invoices(context: dg.AssetExecutionContext, config: InvoiceConfig, warehouse: WarehouseResource):
    """Invoice files per customer and month, month by month (JSON, CSV, HTML, PDF) under data/invoices/YYYY-MM/, with adjustments, prepaid credits and the credits ledger."""  # noqa: E501 (the asset description)
    paths = warehouse.paths()
    models = load_project().models
    by_check: dict[str, list] = {}

    def one_month(key, window) -> dict:
        lines = pq.read_table(partition_file(paths, models["fct_invoice_lines"], window)).to_pylist()
        seeds = {n: pq.read_table(seed_snapshot_path(paths, n)).to_pylist() for n in ("customers", "plans", "currencies")}
        try:
            grants = load_grants(paths.seeds_dir, seeds["customers"], seeds["currencies"])
        except SeedError as e:
            raise dg.Failure(str(e)) from None
        manifest = invoice_manifest(paths, window.start, paths.seeds_dir, code_version())
        # a critical anomaly flag nobody has acknowledged (billing flags ack) holds finalization
        held = {
            customer: "held by unacknowledged critical flags: " + ", ".join(sorted({f"{f['rule']} on {f['meter_id']}" for f in flags}))
            for customer, flags in unacknowledged_critical(paths, window.start).items()
        }
        if held:
            context.log.warning(f"invoices held in draft: {', '.join(sorted(held))}")
        docs = build.build_invoices(
            lines,
            seeds["customers"],
            seeds["plans"],
            seeds["currencies"],
            window.start,
            now=invoice_now(config),
            grace_days=config.grace_days,
            manifest=manifest,
            paths=paths,
            grants=grants,
            held=held,
        )
        # validated before anything is written: a finalized invoice's files are never rewritten
        wrong, missing = _total_problems(lines, docs)
        if wrong or missing:
            raise dg.Failure(
                description=(
                    f"invoices of {window.start:%Y-%m}: check total_equals_sum_of_lines failed, no invoice file was written: "
                    + "; ".join(
                        ([f"charges or total do not add up to the lines of fct_invoice_lines for {', '.join(wrong)}"] if wrong else [])
                        + ([f"no invoice built for {', '.join(missing)}"] if missing else [])
                    )
                    + ". Rerun fct_invoice_lines for the month, then the invoices; if it persists, it is a bug in the invoice builder"
                ),
                metadata={"wrong_totals": dg.MetadataValue.json(wrong), "customers_without_invoice": dg.MetadataValue.json(missing)},
            )
        figures = store.write_invoice_files(paths, docs)
        settlement.settle_drafts(paths, window.start, docs, grants)  # other months' drafts follow this month's draws
        ledger = cr.write_ledger(paths, grants, {c["currency"]: int(c["minor_unit_exponent"]) for c in seeds["currencies"]})
        usage = pq.read_table(
            partition_file(paths, models["fct_usage_by_month"], window),
            columns=["customer_id", "usage", "gauge_peak", "gauge_integral"],
        ).to_pylist()
        unbilled, not_invoiced = build.uninvoiced_customers(
            window.start,
            pq.read_table(seed_snapshot_path(paths, "subscriptions")).to_pylist(),
            usage,
            {d["customer_id"] for d in docs},
            month_flags(paths, window.start),
            seeds["plans"],
        )
        if unbilled:
            context.log.error(f"customers with no invoice and no flag naming why: {unbilled}")
        for result in (
            dg.AssetCheckResult(
                check_name="total_equals_sum_of_lines",
                passed=True,  # a failure raised above, before any file was written
                description="verified on the built invoices before any file was written",
                metadata={"invoices_checked": len(docs)},
            ),
            dg.AssetCheckResult(
                check_name="every_customer_invoiced",
                passed=not unbilled,
                description=(
                    "no invoice and no flag naming why: "
                    + "; ".join(f"{c}: {why}" for c, why in sorted(unbilled.items()))
                    + ". Fix the customer's subscription in seeds/subscriptions.csv or rerun the month's models"
                )
                if unbilled
                else None,
                metadata={"unbilled": dg.MetadataValue.json(unbilled), "not_invoiced_with_reason": dg.MetadataValue.json(not_invoiced)},
            ),
            dg.AssetCheckResult(
                check_name="critical_flags_acknowledged",
                passed=not held,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={"held": dg.MetadataValue.json(held)},
            ),
        ):
            by_check.setdefault(result.check_name, []).append((window, result))
        return {
            "held_by_critical_flags": dg.MetadataValue.json(held),
            "invoices": len(docs),
            "by_status": dg.MetadataValue.json(figures.get("by_status", {})),
            "totals_by_currency": dg.MetadataValue.json(figures.get("totals_by_currency", {})),
            "changed_after_finalization": dg.MetadataValue.json(figures.get("changed_after_finalization", [])),
            "credits_used_by_currency": dg.MetadataValue.json(_credits_used(docs)),
            "credit_grants": ledger["grants"],
            "overdrawn_grants": dg.MetadataValue.json(ledger["overdrawn"]),
            "credits_ledger": dg.MetadataValue.path(ledger["path"]),
            "folder": dg.MetadataValue.path(str(paths.invoices / window.start.strftime("%Y-%m"))),
        }

    # month by month in order: a month's drafts settle against the credits earlier months drew
    materialize_each(context, one_month)
    return dg.MaterializeResult(check_results=[combined_check_result(r) for r in by_check.values()])


def _total_problems(lines: list[dict], docs: list[dict]) -> tuple[list[str], list[str]]:
    """Customers whose invoice does not add up, and customers with lines but no invoice.

    Each invoice's charges are recomputed from the lines table, independently of the invoice builder;
    the total due must be the sum of all its lines (charges, adjustments, credits) and never negative,
    but on a credit note (an adjustment invoice refunding a correction to a customer without an invoice this month).
    """
    by_customer: dict[str, int] = {}
    for line in lines:
        by_customer[line["customer_id"]] = by_customer.get(line["customer_id"], 0) + int(line["amount_minor"])
    wrong = [
        d["customer_id"]
        for d in docs
        if d["charges_minor"] != by_customer.get(d["customer_id"], 0)
        or d["total_minor"] != sum(l["amount_minor"] for l in d["lines"])
        or (d["total_minor"] < 0 and d.get("document") != "credit_note")
    ]
    missing = sorted(set(by_customer) - {d["customer_id"] for d in docs})
    return wrong, missing


def _credits_used(docs: list[dict]) -> dict[str, str]:
    used: dict[str, int] = {}
    exps: dict[str, int] = {}
    for d in docs:
        used[d["currency"]] = used.get(d["currency"], 0) + int(d["credits_used_minor"])
        exps[d["currency"]] = int(d["minor_unit_exponent"])
    return {c: format_minor(used[c], exps[c]) for c in sorted(used)}
