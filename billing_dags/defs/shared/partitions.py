"""The two partitions of billing_dags, defined once and imported everywhere.

A run targets one partition or a range of them (a backfill with a single-run policy, `billing run`,
"Materialize" of several partitions in the UI): every partitioned asset processes each partition of
its range in order with ``partitions_of`` and records each partition's own metadata on that
partition's materialization (``record``).
"""

from collections.abc import Callable
from datetime import date, datetime
from typing import Any

import dagster as dg

from billing_dags.core.settings import partitions_start, shard_count
from billing_dags.core.shards import shard_from_key, shard_keys
from billing_dags.models.sqlmodels import Window

#: the first day of both partitions (YYYY-MM-DD): BILLING_PARTITIONS_START, else the first month of the
#: earliest subscription in the seeds (settings.partitions_start); read once, when the code location loads
PARTITIONS_START = partitions_start().isoformat()

#: UTC days; today is not a partition until it has ended
billing_daily = dg.DailyPartitionsDefinition(start_date=PARTITIONS_START, timezone="UTC")
#: calendar months (UTC); the current month is not a partition until it has ended
billing_monthly = dg.MonthlyPartitionsDefinition(start_date=PARTITIONS_START, timezone="UTC")

#: shards by customer (BILLING_SHARDS, core/shards.py), read once, when the code location loads
SHARDS = shard_count()
#: with more than one shard, the daily models run per (day, shard): a partition per UTC day and shard
#: ("2026-11-03|5"); the ingest assets (which write every shard of a day in one pass) and the daily assets
#: after the models (Stripe hand-off, summaries) stay per day and read every shard of it. With one shard
#: there is no shard dimension: the daily models keep their plain daily partitions (and their history).
billing_shards = dg.StaticPartitionsDefinition(shard_keys(SHARDS)) if SHARDS > 1 else None
billing_daily_shards = dg.MultiPartitionsDefinition({"day": billing_daily, "shard": billing_shards}) if SHARDS > 1 else None
#: the partitions of the daily models: (day, shard) when sharded, else the days
billing_daily_models = billing_daily_shards or billing_daily

BY_NAME: dict[str, dg.PartitionsDefinition | None] = {
    "billing_daily": billing_daily_models,
    "billing_monthly": billing_monthly,
    "none": None,
}

#: the backfill policy of every partitioned asset: a backfill of N partitions is one run, in which
#: each asset's step processes the whole range (day by day, in order) after the steps of the assets
#: it depends on. One run per partition would start a process and pay Dagster's per-run overhead for
#: every day, and assets reading earlier days (lookback) could not run with their upstreams.
SINGLE_RUN = dg.BackfillPolicy.single_run()


def partitions_of(
    context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext,
    partitions_def: dg.TimeWindowPartitionsDefinition | None = None,
) -> list[tuple[str, Window]]:
    """(partition key, half-open [start, end) window) of every partition the run targets, in order.

    One entry for a one-partition run, one per day (or month) of a partition range; empty when
    the run targets no partition. ``partitions_def`` defaults to the asset's own.
    """
    if not (context.has_partition_key or context.has_partition_key_range):
        return []
    if partitions_def is None:
        partitions_def = context.assets_def.partitions_def
    out = []
    for key in context.partition_keys:
        tw = partitions_def.time_window_for_partition_key(key)
        shard = None
        if isinstance(partitions_def, dg.MultiPartitionsDefinition):
            shard = shard_from_key(partitions_def.get_partition_key_from_str(key).keys_by_dimension["shard"], SHARDS)
        out.append((key, Window(_as_date(tw.start), _as_date(tw.end), shard)))
    # (day, shard) partitions shard by shard, each shard's days in order (a day reads its shard's earlier days)
    return sorted(out, key=lambda kw: (kw[1].shard is not None and kw[1].shard.index, kw[1].start))


def day_shard_key(day: str, shard: str) -> str:
    """The partition key of a (day, shard) partition of billing_daily_shards."""
    return str(dg.MultiPartitionKey({"day": day, "shard": shard}))


def days_of(context, partitions_def=None) -> list[Window]:
    """The windows of ``partitions_of``: one day (or month) each, in order."""
    return [w for _, w in partitions_of(context, partitions_def)]


def window_of(context: dg.AssetExecutionContext) -> Window | None:
    """The window of a run of exactly one partition (None when unpartitioned).

    A run over a range of partitions has no single window: assets use ``partitions_of``.
    """
    windows = days_of(context)
    if not windows:
        return None
    if len(windows) > 1:
        raise dg.Failure(
            f"this step covers {len(windows)} partitions ({windows[0].start} to {windows[-1].start}) "
            "but reads one window; process each with partitions_of(context)"
        )
    return windows[0]


def record(context: dg.AssetExecutionContext, key: str | None, metadata: dict[str, Any]) -> None:
    """``metadata`` on the materialization of partition ``key`` only (of the whole asset when None)."""
    if key is None:
        context.add_asset_metadata(metadata)
    else:
        context.add_asset_metadata(metadata, partition_key=key)


def materialize_each(context: dg.AssetExecutionContext, compute: Callable[[str | None, Window | None], dict[str, Any]]) -> dg.MaterializeResult:
    """``compute(key, window)`` for every partition of the run in order (once with None, None when
    unpartitioned); each returns the metadata of its own partition's materialization.

    A partition that fails stops the step there: the partitions before it were published, so their
    materializations are recorded before the error propagates (the log names the failing partition),
    and a rerun or "re-execute from failure" processes the range again.
    """
    parts = partitions_of(context) or [(None, None)]
    done: list[tuple[str | None, dict[str, Any]]] = []
    for key, window in parts:
        try:
            done.append((key, compute(key, window)))
        except Exception:
            if len(parts) > 1:
                asset = context.assets_def.key
                for k, metadata in done:
                    context.log_event(dg.AssetMaterialization(asset_key=asset, partition=k, metadata=metadata))
                context.log.error(
                    f"{asset.to_user_string()} failed on partition {key} ({len(done)} of {len(parts)} partitions of "
                    f"{parts[0][0]}..{parts[-1][0]} were published before it; the rest were not run)"
                )
            raise
    for key, metadata in done:
        record(context, key, metadata)
    return dg.MaterializeResult()


def combined_check_result(results: list[tuple[Window | None, dg.AssetCheckResult]]) -> dg.AssetCheckResult:
    """One check's result over the run's partitions, in order: its own result for one partition;
    else passed when every partition passed, with each partition's metadata and a description
    naming the failing partitions."""
    if len(results) == 1:
        return results[0][1]
    first = results[0][1]
    failing = [(w, r) for w, r in results if not r.passed]
    plain = lambda r: {k: getattr(v, "value", v) for k, v in r.metadata.items()}  # noqa: E731
    return dg.AssetCheckResult(
        check_name=first.check_name,
        asset_key=first.asset_key,
        passed=not failing,
        severity=first.severity,
        metadata={
            "partitions": len(results),
            "failing_partitions": dg.MetadataValue.json([str(w.start) for w, _ in failing]),
            "by_partition": dg.MetadataValue.json({str(w.start): plain(r) for w, r in results}),
        },
        description=("; ".join(f"{w.start}: {r.description or plain(r)}" for w, r in failing) if failing else first.description),
    )


def partition_check_evaluations(context, results: list[tuple[str, dg.AssetCheckResult]]) -> list[dg.AssetCheckEvaluation]:
    """A check's result on each partition of a run over several partitions, recorded against that partition.

    Dagster records an ``AssetCheckResult`` against the run's partition, and a run over a range has none: its
    result would show no partition ("Partition —"), and a sharded day is always such a run (its shards).
    """
    spec = {s.key.name: s for s in context.assets_def.check_specs}
    return [
        dg.AssetCheckEvaluation(
            asset_key=r.asset_key or context.assets_def.key,
            check_name=r.check_name,
            passed=r.passed,
            metadata=r.metadata,
            severity=r.severity,
            description=r.description,
            blocking=spec[r.check_name].blocking,
            partition=key,
        )
        for key, r in results
    ]


def _as_date(d: datetime) -> date:
    return date(d.year, d.month, d.day)
