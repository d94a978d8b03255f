"""How every run executes its steps: one after another, in the run's own process."""

import dagster as dg

# The default (multiprocess) executor starts a Python process per step: ~2-4 s of imports each, 13
# steps a day, while a day's compute is ~2-5 s. The steps of a run depend on each other in a chain
# (ingest -> edges -> usage -> outbox -> send, month -> rating -> lines -> invoices), so parallel
# steps would gain little; DuckDB parallelises inside a step on every core instead. A backfill is
# one run over the whole range (BackfillPolicy.single_run), so it too starts one process.
defs = dg.Definitions(executor=dg.in_process_executor)
