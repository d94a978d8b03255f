"""Asset checks on SQL model partitions. Each runs on the new rows before they are published.

The checks are the model's grain (``grain`` in its config, guarded by ``sqlmodels.write_partition``)
and its audits: SQL files next to the model (``audits/<model>__<audit>.sql``, run by
``billing_dags.models.audits``) that return the failing rows. Blocking checks stop downstream assets in
the same run: money depends on them; the others are warnings.
"""

import dagster as dg
import pyarrow.parquet as pq

from billing_dags.core.settings import Paths
from billing_dags.models.audits import AuditResult, audits_of, run_audits
from billing_dags.models.sqlmodels import Model, Window, partition_file


def grain_is_unique(model: Model, published=None) -> dg.AssetCheckResult:
    """The result of the grain guard: ``sqlmodels.write_partition`` refuses rows with a duplicate key
    before anything runs on them (the asset's other checks included), so new rows that get here passed it.
    With ``published`` (a published partition's rows, when the check runs alone) the keys are counted."""
    meta = {"grain": ", ".join(model.grain)}
    if published is None:
        return dg.AssetCheckResult(
            check_name="grain_is_unique",
            passed=True,
            metadata={"duplicate_keys": 0, **meta},
            description="checked on the new rows before the partition was published (sqlmodels.check_grain)",
        )
    dupes = 0
    if len(published) > 1:
        counts = published.group_by(list(model.grain), use_threads=False).aggregate([([], "count_all")])
        dupes = sum(1 for n in counts["count_all"].to_pylist() if n > 1)
    return dg.AssetCheckResult(
        check_name="grain_is_unique",
        passed=dupes == 0,
        metadata={"duplicate_keys": dupes, **meta},
        description="checked on the published partition",
    )


def check_specs(model: Model, partitions_def) -> list[dg.AssetCheckSpec]:
    """The model's checks as Dagster shows them: the grain, then one per audit file."""
    specs = []
    if model.grain:
        specs.append(
            dg.AssetCheckSpec(
                "grain_is_unique",
                asset=model.name,
                blocking=True,
                description=f"one row per ({', '.join(model.grain)})",
                partitions_def=partitions_def,
            )
        )
    for audit in audits_of(model.name):
        specs.append(
            dg.AssetCheckSpec(
                audit.name,
                asset=model.name,
                blocking=audit.blocking,
                description=audit.description,
                partitions_def=partitions_def,
                metadata={"sql": dg.MetadataValue.path(str(audit.path))},
            )
        )
    return specs


def audit_check_result(result: AuditResult) -> dg.AssetCheckResult:
    """An audit's result as an asset check result: a non-blocking audit fails as a warning."""
    return dg.AssetCheckResult(
        check_name=result.audit.name,
        passed=result.passed,
        severity=dg.AssetCheckSeverity.ERROR if result.audit.blocking else dg.AssetCheckSeverity.WARN,
        metadata={
            "failing_rows": result.failing_rows,
            "rows_checked": result.rows_checked,
            "examples": dg.MetadataValue.json(list(result.examples)),
            "sql": dg.MetadataValue.path(str(result.audit.path)),
        },
    )


def evaluate(model: Model, paths: Paths, window: Window | None, table, *, published: bool = False) -> list[tuple[dg.AssetCheckResult, bool]]:
    """Every check of ``model`` on ``table`` (its new rows, or with ``published`` its published partition),
    with whether it blocks."""
    results = [(grain_is_unique(model, table if published else None), True)] if model.grain else []
    results += [(audit_check_result(r), r.audit.blocking) for r in run_audits(paths, model, window, table)]
    return results


def evaluate_published(model: Model, paths: Paths, window: Window | None) -> list[dg.AssetCheckResult]:
    """The checks run alone (from the UI's check page): on the partition as it was published."""
    path = partition_file(paths, model, window)
    if not path.exists():
        what = f"{window.start}" if window else "the table"
        names = (["grain_is_unique"] if model.grain else []) + [a.name for a in audits_of(model.name)]
        return [
            dg.AssetCheckResult(
                check_name=name,
                passed=False,
                metadata={"path": dg.MetadataValue.path(str(path))},
                description=f"{model.name} has no published partition for {what}; materialize it first",
            )
            for name in names
        ]
    return [r for r, _ in evaluate(model, paths, window, pq.read_table(path), published=True)]
