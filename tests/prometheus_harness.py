"""Test and benchmark harness for Prometheus: OpenMetrics files, promtool backfill, and a local server.

``LocalPrometheus`` runs ``prometheus`` on 127.0.0.1 (a free port) in its own process group.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import requests
from servers import free_port

from billing_dags.ingest.prometheus import format_time


def openmetrics_label_value(value: str) -> str:
    """A label value escaped for the OpenMetrics text format (backslash, quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _om_number(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)


def write_openmetrics(path, families: dict[str, tuple[str, list[tuple[dict[str, str], Sequence[int], Sequence[float]]]]]) -> int:
    """Write ``{family: (type, [(labels incl. __name__, ts_ms, values), ...])}`` as an OpenMetrics file
    for ``promtool tsdb create-blocks-from openmetrics`` (timestamps in seconds). Returns the sample count."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for family, (kind, series) in families.items():
            f.write(f"# TYPE {family} {kind}\n")
            for labels, ts_ms, values in series:
                labels = dict(labels)
                name = labels.pop("__name__")
                lab = ",".join(f'{k}="{openmetrics_label_value(v)}"' for k, v in sorted(labels.items()))
                head = f"{name}{{{lab}}}" if lab else name
                lines = [f"{head} {_om_number(float(v))} {format_time(int(t))}\n" for t, v in zip(ts_ms, values)]
                f.writelines(lines)
                n += len(lines)
        f.write("# EOF\n")
    return n


def backfill(openmetrics_file, tsdb_dir, promtool: str = "promtool", timeout_s: float = 1800) -> float:
    """``promtool tsdb create-blocks-from openmetrics``; returns the seconds it took."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [promtool, "tsdb", "create-blocks-from", "openmetrics", str(openmetrics_file), str(tsdb_dir)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"promtool backfill of {openmetrics_file} failed: {proc.stderr.strip()[-2000:]}")
    return time.perf_counter() - t0


class LocalPrometheus:
    """``prometheus`` on 127.0.0.1 (a free port) over ``tsdb_dir``, in its own process group.

    Use as a context manager; :meth:`stop` sends SIGTERM to the group (SIGKILL after 10 s).
    """

    def __init__(self, tsdb_dir, binary: str = "prometheus", port: int | None = None, log_file=None, extra_args: Sequence[str] = ()):
        self.extra_args = list(extra_args)
        self.tsdb_dir = str(tsdb_dir)
        self.binary = binary
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = log_file
        self.proc = None

    def start(self, ready_timeout_s: float = 30.0) -> LocalPrometheus:
        config = Path(self.tsdb_dir).parent / f"prometheus-{self.port}.yml"
        config.write_text("global:\n  scrape_interval: 1m\nscrape_configs: []\n")
        with open(self.log_file or os.devnull, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.tsdb_dir}",
                    "--storage.tsdb.retention.time=10y",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                    *self.extra_args,
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with code {self.proc.returncode} (log: {self.log_file})")
            try:
                if requests.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"prometheus on {self.url} not ready after {ready_timeout_s}s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
