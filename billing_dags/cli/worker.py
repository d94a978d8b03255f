"""`billing worker`: a Celery worker that executes the steps of this code location's runs (BILLING_EXECUTOR=celery)."""

from __future__ import annotations

import os

from billing_dags.cli.common import CliError, err_console, paths_of
from billing_dags.core.settings import CELERY_LANDING_QUEUE, executor_settings, redact_url, worker_queues

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def register(sub) -> None:
    p = sub.add_parser("worker", help="a Celery worker for the steps of runs with BILLING_EXECUTOR=celery (docs/scale-out.md)")
    p.add_argument("--concurrency", type=int, default=1, help="steps run at once, each in a process of its own (default 1: a step uses every core)")
    p.add_argument("--name", help="the worker's name (default billing-<pid>@<host>)")
    p.add_argument("--loglevel", choices=LOG_LEVELS, default="INFO", help="the worker's log level (default INFO)")
    p.add_argument(
        "--landing",
        action="store_true",
        help=f"also run the steps that read the receivers' landing (queue {CELERY_LANDING_QUEUE}): with BILLING_DATA_URL, "
        "only on the receivers' machine (without it, every worker runs them)",
    )
    p.set_defaults(func=cmd_worker)


def preload(paths) -> None:
    """Load the code location and a Dagster instance's storage in the worker's main process, pointed at
    ``paths``: the processes that run the steps are forked from it with every module imported, so their
    first step does not pay ~10 s of imports (each step opens the run's instance from its reference)."""
    import tempfile

    import dagster as dg

    os.environ["BILLING_DATA_DIR"] = str(paths.data_dir)
    os.environ["BILLING_SEEDS_DIR"] = str(paths.seeds_dir)
    from billing_dags.definitions import defs

    defs()
    with tempfile.TemporaryDirectory() as tmp, dg.DagsterInstance.local_temp(tmp) as instance, dg.DagsterInstance.from_ref(instance.get_ref()) as again:
        again.get_runs(limit=1)


def cmd_worker(args) -> int:
    kind = os.environ.get("BILLING_EXECUTOR", "").strip()
    if kind and kind != "celery":
        raise CliError(
            f"BILLING_EXECUTOR={kind!r}: a worker runs the steps of the celery executor; set BILLING_EXECUTOR=celery "
            "(or unset it) here and where runs are launched"
        )
    if args.concurrency < 1:
        raise CliError(f"--concurrency {args.concurrency} must be at least 1")
    # the code location a worker loads is the one the runs' executor was built from: celery
    os.environ["BILLING_EXECUTOR"] = "celery"
    settings = executor_settings()
    paths = paths_of(args)
    name = args.name or f"billing-{os.getpid()}@%h"
    queues = worker_queues(args.landing)
    from billing_dags.defs.shared.executor import celery_worker_app

    app = celery_worker_app(settings)
    err_console.print(
        f"worker {name}: broker {redact_url(settings.broker() or '')}, queues {','.join(queues)}, concurrency {args.concurrency}, "
        f"data dir {paths.data_dir}, seeds {paths.seeds_dir}",
        highlight=False,
        soft_wrap=True,
    )
    preload(paths)
    argv = [
        "worker",
        f"--queues={','.join(queues)}",
        f"--concurrency={args.concurrency}",
        f"--hostname={name}",
        f"--loglevel={args.loglevel}",
        "--prefetch-multiplier=1",
        "--without-gossip",
        "--without-mingle",
    ]
    try:
        app.worker_main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0
