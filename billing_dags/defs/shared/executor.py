"""How every run executes its steps: configuration (BILLING_EXECUTOR), read when the code location loads.

- ``in_process`` (the default, `make demo` and the tests): one step after another, in the run's own
  process. The default (multiprocess) executor would start a Python process per step: ~2-4 s of
  imports each, 13 steps a day, while a day's compute is ~2-5 s. The steps of a run depend on each
  other in a chain (ingest -> edges -> usage -> outbox -> send, month -> rating -> lines -> invoices),
  so parallel steps would gain little on one machine; DuckDB parallelises inside a step on every core
  instead. A backfill is one run over the whole range (BackfillPolicy.single_run), so it too starts
  one process.
- ``multiprocess``: Dagster's multiprocess executor (a process per step, on the run's machine).
- ``k8s_job``: Dagster's Kubernetes job executor (dagster-k8s): each step a Kubernetes Job in the image
  of the code location's user deployment (deploy/helm/values.yaml, docs/scale-out.md).
- ``celery``: each step is a Celery task (dagster-celery) on the workers consuming the ``dagster``
  queue of the broker BILLING_CELERY_BROKER (Redis), on any number of machines that share the data
  directory and the Dagster instance's storage (docs/scale-out.md). Start a worker with
  ``billing worker``; it loads this code location once and runs the steps it is handed.

The broker and result backend URLs are read from their environment variables when a run starts
(StringSource ``env``), never written into run config: a password in them never shows in the UI.
"""

from __future__ import annotations

import dagster as dg

from billing_dags.core.settings import CELERY_QUEUE, ExecutorSettings, SettingsError, executor_settings

#: settings of the Celery app on both sides (the run's executor and the workers): one task at a time per
#: worker process (a step is seconds to minutes of DuckDB on every core, never worth prefetching), and
#: tasks acknowledged when done, so a worker lost mid-step hands its step to another worker
CELERY_APP_SETTINGS = {
    "task_default_queue": CELERY_QUEUE,
    "worker_prefetch_multiplier": 1,
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "broker_connection_retry_on_startup": True,
}


def _dagster_celery():
    try:
        import dagster_celery
    except ImportError:
        raise SettingsError(
            "BILLING_EXECUTOR=celery needs dagster-celery and the redis client, which are not installed; "
            "install the celery extra (pip install 'billing_dags[celery]') or unset BILLING_EXECUTOR"
        ) from None
    return dagster_celery


def _dagster_k8s():
    try:
        import dagster_k8s
    except ImportError:
        raise SettingsError(
            "BILLING_EXECUTOR=k8s_job needs dagster-k8s, which is not installed; install the k8s extra "
            "(pip install 'billing_dags[k8s]', as the image of deploy/Dockerfile does) or unset BILLING_EXECUTOR"
        ) from None
    return dagster_k8s


def celery_executor_config(settings: ExecutorSettings) -> dict:
    """The celery executor's config: broker and backend read from their variables when a run starts."""
    return {
        "broker": {"env": settings.broker_var},
        "backend": {"env": settings.backend_var} if settings.backend_var else "rpc://",
        "config_source": dict(CELERY_APP_SETTINGS),
    }


def build_executor(settings: ExecutorSettings | None = None) -> dg.ExecutorDefinition:
    """The executor ``settings`` (default: the environment's) name."""
    settings = settings or executor_settings()
    if settings.kind == "in_process":
        return dg.in_process_executor
    if settings.kind == "multiprocess":
        return dg.multiprocess_executor
    if settings.kind == "k8s_job":
        return _dagster_k8s().k8s_job_executor
    return _dagster_celery().celery_executor.configured(celery_executor_config(settings))


def celery_worker_app(settings: ExecutorSettings):
    """The Celery app of a worker for this code location: the broker, backend and settings of the
    executor (``celery_executor_config``), and dagster-celery's task that executes one step."""
    _dagster_celery()
    from dagster_celery.executor import CeleryExecutor
    from dagster_celery.make_app import make_app
    from dagster_celery.tasks import create_task

    # as dagster-celery's own `dagster-celery worker start` builds its app
    app = make_app(CeleryExecutor.for_cli(broker=settings.broker(), backend=settings.backend(), config_source=dict(CELERY_APP_SETTINGS)).app_args())
    create_task(app)
    return app


@dg.definitions
def defs() -> dg.Definitions:
    """The executor of every job of the code location, chosen when it loads (the environment is read then)."""
    return dg.Definitions(executor=build_executor())
