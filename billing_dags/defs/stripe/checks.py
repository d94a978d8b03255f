"""The reconciliation of Stripe with the invoices, as an asset check after sending."""

import dagster as dg

from billing_dags.core.calendar import month_start
from billing_dags.defs.shared.partitions import billing_daily, partitions_of
from billing_dags.defs.shared.resources import StripeResource, WarehouseResource


@dg.asset_check(
    asset="stripe_meter_events",
    name="reconciled_with_invoices",
    partitions_def=billing_daily,
    description="Stripe's meter event summaries equal the quantities of the month's invoice lines, line by line (each difference named with its cause).",
)
def reconciled_with_invoices(context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource, stripe: StripeResource) -> dg.AssetCheckResult:
    """Every month of the run's days that has invoice lines; passes (saying why) in dry-run or before the month is invoiced."""
    from billing_dags.seeds.catalog import load_seeds
    from billing_dags.stripe.reconcile import ReconcileError, reconcile_with_client, summary

    paths = warehouse.paths()
    client = stripe.client()
    months = sorted({month_start(w.start) for _, w in partitions_of(context, billing_daily)})
    if client is None:
        return dg.AssetCheckResult(passed=True, description="dry-run (no STRIPE_API_KEY): nothing in Stripe to reconcile")
    seeds = load_seeds(paths.seeds_dir)
    counts: dict[str, int] = {}
    differences: list[dict] = []
    skipped: list[str] = []
    for m in months:
        try:
            checks = reconcile_with_client(paths, m, seeds, client)
        except ReconcileError as e:
            skipped.append(f"{m:%Y-%m}: {e}")
            continue
        for status, n in summary(checks).items():
            counts[status] = counts.get(status, 0) + n
        differences += [c.as_row() for c in checks if c.status != "equal"]
    metadata = {
        "lines": dg.MetadataValue.json(counts),
        "differences": dg.MetadataValue.json(differences[:50]),
        "not_invoiced_yet": dg.MetadataValue.json(skipped),
    }
    if differences:
        first = differences[0]
        return dg.AssetCheckResult(
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            metadata=metadata,
            description=f"{len(differences)} invoice lines differ from Stripe, e.g. {first['customer']} {first['event_name']}: {first['cause']}",
        )
    return dg.AssetCheckResult(passed=True, metadata=metadata)
