"""`billing retention`: remove raw data past the retention period."""

from __future__ import annotations

from billing_dags.cli.common import CliError, console, emit, paths_of
from billing_dags.core.settings import DEFAULT_RETENTION_DAYS
from billing_dags.operations.retention import apply, plan


def register(sub) -> None:
    p = sub.add_parser("retention", help="remove raw data past the retention period (never behind a draft invoice)")
    p.add_argument("--days", type=int, default=DEFAULT_RETENTION_DAYS, help="retention in days (default 90)")
    p.add_argument("--dry-run", action="store_true", help="show what would be removed, remove nothing")
    p.set_defaults(func=cmd_retention)


def cmd_retention(args) -> int:
    paths = paths_of(args)
    try:
        candidates = plan(paths, retention_days=args.days)
    except ValueError as e:
        raise CliError(f"--days {args.days}: {e}") from None
    rows = [{"action": c.action, "path": str(c.path), "bytes": c.bytes, "reason": c.reason} for c in candidates]
    if not rows:
        console.print(f"nothing is older than {args.days} days under {paths.data_dir}")
        return 0
    if args.dry_run:
        emit(rows, "table", title=f"Retention plan ({args.days} days), dry run: nothing removed")
        return 0
    figures = apply(candidates, log=lambda msg: console.print(msg, highlight=False))
    console.print(f"removed {figures['removed']} paths ({figures['bytes_freed']:,} bytes), kept {figures['kept']}")
    return 0
