"""`billing export-metrics` and `python -m billing_dags.cli.metrics --write-rules`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from billing_dags.cli.common import CliError, err_console, paths_of
from billing_dags.core import durable
from billing_dags.core.calendar import parse_month
from billing_dags.core.settings import PROJECT_ROOT
from billing_dags.operations.metrics_export import RULES_FILE, export_metrics, render_recording_rules


def cmd_export_metrics(args) -> int:
    paths = paths_of(args)
    month = parse_month(args.month) if args.month else None
    if args.output and not str(args.output).endswith(".prom"):
        raise CliError(f"-o {args.output}: the textfile collector only reads files ending in .prom; e.g. -o /var/lib/node_exporter/billing.prom")
    text = export_metrics(paths, month, Path(args.output) if args.output else None)
    if args.output:
        err_console.print(f"wrote {len(text):,} bytes to {args.output}")
    else:
        sys.stdout.write(text.decode())
    return 0


def register(sub) -> None:
    p = sub.add_parser("export-metrics", help="billing aggregates in Prometheus exposition format (textfile collector)")
    p.add_argument("--month", help="YYYY-MM (default: the current month: month-to-date and projected)")
    p.add_argument("-o", "--output", help="write to this .prom file atomically (default: stdout)")
    p.set_defaults(func=cmd_export_metrics)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="generate prometheus/billing_recording_rules.yml from the seeds")
    parser.add_argument("--write-rules", action="store_true", help=f"write {RULES_FILE}")
    parser.add_argument("--seeds-dir", default=str(PROJECT_ROOT / "seeds"))
    args = parser.parse_args(argv)
    from billing_dags.seeds.catalog import load_seeds

    text = render_recording_rules(load_seeds(Path(args.seeds_dir)))
    if args.write_rules:
        durable.write_bytes(RULES_FILE, text.encode())
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
