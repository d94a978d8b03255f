"""Hostile clients against the real receiver (`billing remote-write serve` as its own process).

Slow uploads, idle and slow-header connections, connections beyond a low file limit, deeply nested
JSON before authentication, huge numbers after it, oversized bodies before it: each is refused with
a 4xx or timed out, never a 5xx or a traceback, while a legitimate writer keeps getting 2xx. Timeouts
are configured short so each attack lasts a few seconds.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
import remote_write_corpus as corpus
import requests
from servers import free_port, receiver_command

from billing_dags.core.settings import PROJECT_ROOT
from billing_dags.ingest.remote_write.server import REPORT_PATH, WRITE_PATH

pytestmark = pytest.mark.integration

WRITE_TOKEN = "write-token-for-tests"
REPORT_TOKEN = "report-token-for-tests-iot-010"
PROTO = {"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy", "X-Prometheus-Remote-Write-Version": "0.1.0"}


@dataclass
class Receiver:
    url: str
    port: int
    log: Path
    proc: subprocess.Popen
    figures: dict = field(default_factory=dict)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _start(tmp_path: Path, *flags: str, nofile: int | None = None) -> Receiver:
    seeds = tmp_path / "seeds"
    shutil.copytree(PROJECT_ROOT / "seeds", seeds)
    with (seeds / "report_tokens.csv").open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["customer_id", "token_sha256", "description"])
        w.writerow(["iot-010", hashlib.sha256(REPORT_TOKEN.encode()).hexdigest(), "test token"])
    (tmp_path / "token").write_text(WRITE_TOKEN + "\n")
    port = free_port()
    log = tmp_path / "receiver.log"

    def limit_files():
        if nofile:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with log.open("ab") as out:
        proc = subprocess.Popen(
            receiver_command(tmp_path / "data", seeds, port, "--token-file", str(tmp_path / "token"), *flags),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=limit_files,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if requests.get(url + "/-/ready", timeout=1).ok:
                return Receiver(url, port, log, proc)
        except requests.ConnectionError:
            pass
        assert proc.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.1)


@pytest.fixture
def start(tmp_path):
    started: list[Receiver] = []

    def _go(*flags: str, nofile: int | None = None) -> Receiver:
        r = _start(tmp_path, *flags, nofile=nofile)
        started.append(r)
        return r

    yield _go
    for r in started:
        os.killpg(r.proc.pid, signal.SIGTERM)
        r.proc.wait(30)
        print(f"\n{r.figures}")  # the figures of the attack (pytest -s shows them)
        text = r.log_text()
        assert "Traceback" not in text and "Exception in ASGI application" not in text, text[-3000:]


def _write_body(i: int) -> bytes:
    now = int(time.time() * 1000)
    return corpus.body([({"__name__": "stratum_submits_total", "job": "proxy", "client_id": "miner-001"}, [(now, float(i))])])


def legit_write(r: Receiver, i: int) -> int:
    headers = {**PROTO, "Authorization": f"Bearer {WRITE_TOKEN}"}
    return requests.post(r.url + WRITE_PATH, data=_write_body(i), headers=headers, timeout=10).status_code


def report(i: int, **fields) -> dict:
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    return {
        "report_id": f"r-{i}",
        "customer_id": "iot-010",
        "reported_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "interval_seconds": 3600,
        "mqtt_bytes_sent": 1000 + i,
        **fields,
    }


def post_report(r: Receiver, body: bytes | str, token: str = REPORT_TOKEN) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    return requests.post(r.url + REPORT_PATH, data=body, headers=headers, timeout=10)


def _connect(r: Receiver) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", r.port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _answer(s: socket.socket) -> bytes:
    """What the server sends until it closes (b'' when it closed without answering)."""
    chunks = []
    try:
        while chunk := s.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def _status(answer: bytes) -> int | None:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None


def _head(path: str, token: str, ctype: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: {ctype}\r\n"
        f"Content-Encoding: snappy\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def _writer_during(r: Receiver, attack_over: threading.Event, figures: dict) -> None:
    """Legitimate remote writes and usage reports, one after another, until the attack is over."""
    codes: list[int] = []
    i = 0
    while not attack_over.is_set() or i < 10:
        codes.append(legit_write(r, i))
        codes.append(post_report(r, json.dumps(report(i))).status_code)
        i += 1
    figures["legit_requests"] = len(codes)
    figures["legit_not_2xx"] = [c for c in codes if not 200 <= c < 300]


def test_slow_uploads_do_not_block_legitimate_writers(start):
    """More slow uploads (valid token) than the in-flight limit: cut at the read timeout, writers unaffected."""
    r = start("--max-in-flight", "4", "--read-timeout", "2", "--idle-timeout", "30")
    n = 16
    answers: list[bytes] = []
    lock = threading.Lock()
    stop = threading.Event()

    def slow_upload(path: str, token: str, ctype: str) -> None:
        s = _connect(r)
        s.sendall(_head(path, token, ctype, 4000))
        s.settimeout(0.2)
        got = b""
        while not stop.is_set():  # one byte per 200 ms: 4000 bytes would take 800 s
            try:
                s.send(b"\x00")
                got = s.recv(65536)
                break  # an answer, or b"" when the server closed the connection
            except TimeoutError:
                continue
            except OSError:
                break
        s.settimeout(10)
        with lock:
            answers.append(got + _answer(s))
        s.close()

    uploads = [threading.Thread(target=slow_upload, args=(WRITE_PATH, WRITE_TOKEN, "application/x-protobuf")) for _ in range(n)]
    uploads += [threading.Thread(target=slow_upload, args=(REPORT_PATH, REPORT_TOKEN, "application/json")) for _ in range(n)]
    t0 = time.monotonic()
    for t in uploads:
        t.start()
    attack_over = threading.Event()
    figures: dict = {"slow_uploads": len(uploads)}
    writer = threading.Thread(target=_writer_during, args=(r, attack_over, figures))
    writer.start()
    for t in uploads:
        t.join(30)
    attack_over.set()
    stop.set()
    writer.join(60)
    figures["slow_upload_answers"] = sorted({_status(a) for a in answers}, key=str)
    figures["attack_seconds"] = round(time.monotonic() - t0, 1)
    r.figures = figures
    assert figures["legit_not_2xx"] == [], figures
    assert figures["legit_requests"] >= 20
    assert len(answers) == len(uploads) and {_status(a) for a in answers} == {408}, figures
    assert figures["attack_seconds"] < 15  # read timeout 2 s: no upload held its connection for long


def test_idle_and_slow_header_connections_are_closed(start):
    r = start("--idle-timeout", "1")
    idle = [_connect(r) for _ in range(40)]
    slow = [_connect(r) for _ in range(10)]
    t0 = time.monotonic()
    stop = threading.Event()

    def trickle_header(s: socket.socket) -> None:
        head = b"POST /api/v1/write HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
        for b in head:  # one byte per 100 ms: the head would take 17 minutes
            if stop.wait(0.1):
                return
            try:
                s.send(bytes([b]))
            except OSError:
                return

    threads = [threading.Thread(target=trickle_header, args=(s,)) for s in slow]
    for t in threads:
        t.start()
    closed_after = []
    for s in idle + slow:
        s.settimeout(10)
        assert _answer(s) == b""  # closed without an answer, and not by the 10 s socket timeout
        closed_after.append(time.monotonic() - t0)
    stop.set()
    for t in threads:
        t.join(5)
    r.figures = {"idle": len(idle), "slow_headers": len(slow), "closed_within_s": round(max(closed_after), 1)}
    assert max(closed_after) < 5, r.figures
    assert legit_write(r, 1) == 204


def test_connections_beyond_a_low_file_limit_do_not_lock_writers_out(start):
    """A file limit of 128: at most 64 connections; 400 idle ones make room for writers, no 503 from EMFILE."""
    r = start("--idle-timeout", "60", nofile=128)
    idle = []
    for _ in range(400):
        try:
            idle.append(_connect(r))
        except OSError:
            break
    figures: dict = {"idle_connections_opened": len(idle)}
    codes = []
    for i in range(20):
        codes.append(legit_write(r, i))
        codes.append(post_report(r, json.dumps(report(i))).status_code)
    figures["legit_requests"] = len(codes)
    figures["legit_not_2xx"] = [c for c in codes if not 200 <= c < 300]
    metrics = requests.get(r.url + "/metrics", timeout=10).text
    figures["evicted"] = next(
        float(l.split()[-1]) for l in metrics.splitlines() if l.startswith('billing_remote_write_connections_closed_total{reason="evicted"}')
    )
    r.figures = figures
    for s in idle:
        s.close()
    assert len(idle) == 400
    assert figures["legit_not_2xx"] == [], figures
    assert figures["evicted"] >= 400 - 64


def test_deeply_nested_json_is_refused_before_and_after_auth(start):
    r = start()
    nested = "[" * 60_000  # under the 64 KiB limit
    stranger = post_report(r, nested, token="x")
    assert stranger.status_code == 401, stranger.text  # the token is checked before the body is parsed
    customer = post_report(r, '{"customer_id": "iot-010", "x": ' + nested)
    assert customer.status_code == 400 and customer.json()["field"] == "body", customer.text
    assert "deeper" in customer.json()["error"]
    objects = post_report(r, '{"customer_id": "iot-010", "a": {"b": {"c": {"d": {"e": 1}}}}}')
    assert objects.status_code == 400 and objects.json()["field"] == "body", objects.text
    assert post_report(r, json.dumps(report(1))).status_code == 201
    r.figures = {"nested_requests": 3, "answers": [stranger.status_code, customer.status_code, objects.status_code]}


HUGE = [
    ("mqtt_bytes_sent", "9e999999999"),
    ("mqtt_bytes_sent", "1e-999999999"),
    ("postgres_size_mb", "-9e999999999"),
    ("http_requests", "1" * 5000),
    ("interval_seconds", "9e999999999"),
]


def test_huge_numbers_after_auth_get_400_naming_the_field(start):
    r = start()
    answers, slowest = [], 0.0
    for name, number in HUGE:
        doc = json.dumps(report(1, **{name: "NUMBER"})).replace('"NUMBER"', number)
        t0 = time.monotonic()
        got = post_report(r, doc)
        slowest = max(slowest, time.monotonic() - t0)
        answers.append(got.status_code)
        assert got.status_code == 400 and got.json()["field"] == name, (number[:20], got.text)
    assert post_report(r, json.dumps(report(2))).status_code == 201
    r.figures = {"huge_number_requests": len(HUGE), "answers": sorted(set(answers)), "slowest_s": round(slowest, 2)}


OVERSIZED = [
    (REPORT_PATH, "x", "application/json", 401),
    (REPORT_PATH, REPORT_TOKEN, "application/json", 413),
    (WRITE_PATH, "x", "application/x-protobuf", 401),
    (WRITE_PATH, WRITE_TOKEN, "application/x-protobuf", 413),
]


def test_an_oversized_body_is_answered_before_it_is_read(start):
    """50 MB announced, 10 bytes sent: the answer comes at once and the connection is closed."""
    r = start("--read-timeout", "30")
    answers = []
    for path, token, ctype, expected in OVERSIZED:
        s = _connect(r)
        s.sendall(_head(path, token, ctype, 50_000_000) + b"0123456789")
        s.settimeout(5)  # well under the read timeout: the server did not wait for the body
        try:
            answer = _answer(s)
        except TimeoutError:
            answer = b"(no answer within 5 s)"
        s.close()
        answers.append(_status(answer))
        assert _status(answer) == expected, (path, token, answer[:300])
    r.figures = {"oversized_requests": len(OVERSIZED), "answers": answers}


def test_bodies_being_received_are_bounded_in_bytes(start):
    """Bodies still arriving are not counted by --max-in-flight: their bytes are, all connections together
    (max-in-flight x max-body-bytes), so fast senders of big bodies cannot make the receiver hold unbounded memory."""
    r = start("--max-in-flight", "2", "--max-body-bytes", "1000000", "--read-timeout", "30")
    sockets = []
    for _ in range(3):  # 3 x 900 kB of 1 MB bodies: over the 2 MB the receiver holds at most
        s = _connect(r)
        s.sendall(_head(WRITE_PATH, WRITE_TOKEN, "application/x-protobuf", 1_000_000) + b"x" * 900_000)
        sockets.append(s)
    statuses = []
    for s in sockets:
        s.settimeout(2)
        try:
            statuses.append(_status(_answer(s)))
        except TimeoutError:
            statuses.append(None)  # still being received
        s.close()
    r.figures = {"bodies": len(sockets), "answers": statuses}
    assert 503 in statuses and set(statuses) <= {503, None}, statuses
    assert legit_write(r, 1) == 204  # the budget is given back
