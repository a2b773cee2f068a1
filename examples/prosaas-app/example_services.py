"""Stand-ins for the real services, so `docker compose up` shows something real.

    python -m example_services api          # HTTP on $PORT (default 8000), GET /healthz
                                            # (which asks the database, when a URL is set)
    python -m example_services worker       # long-running; stops cleanly on SIGTERM
    python -m example_services calls        # likewise
    python -m example_services healthcheck  # exit 0 when the api answers /healthz

Each one runs as PID 1 of its container (prosaas-migrate execs it), so it installs its own
SIGTERM handler: for PID 1 the kernel ignores a signal that has no handler. Each reads its
database URL as prosaas-migrate does: DATABASE_URL, or the file DATABASE_URL_FILE names (a
Docker or Kubernetes secret).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType

NAMES = {"api": "prosaas-api", "worker": "worker", "calls": "prosaas-calls"}


def say(service: str, message: str) -> None:
    print(f"[{NAMES[service]}] {message}", flush=True)


class NoUrl(Exception):
    """DATABASE_URL cannot be had; the message says why, never what a file holds."""


def database_url() -> tuple[str | None, str]:
    """(the URL or keyword string, where it came from): DATABASE_URL, or the file that
    DATABASE_URL_FILE names, without the newline around it; (None, "unset") when neither is."""
    value = os.environ.get("DATABASE_URL", "").strip()
    path = os.environ.get("DATABASE_URL_FILE", "").strip()
    if not path:
        return (value, "DATABASE_URL") if value else (None, "unset")
    if value:
        raise NoUrl("DATABASE_URL and DATABASE_URL_FILE are both set; set only one of them")
    try:
        with open(path, encoding="utf-8-sig") as secret:
            text = secret.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise NoUrl(f"DATABASE_URL_FILE: cannot read {path!r}: {reason}") from None
    if not text:
        raise NoUrl(f"DATABASE_URL_FILE: {path!r} is empty")
    return text, f"DATABASE_URL_FILE={path}"


def database_answers(url: str) -> bool:
    import psycopg  # installed with prosaas-migrate

    libpq = url.replace("postgresql+psycopg://", "postgresql://", 1)
    try:
        with psycopg.connect(libpq, connect_timeout=2, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def on_stop(callback: object) -> threading.Event:
    """An event set by SIGTERM or SIGINT, after which `callback` (if callable) runs."""
    stopped = threading.Event()

    def handle(signum: int, _frame: FrameType | None) -> None:
        stopped.set()
        if callable(callback):
            threading.Thread(target=callback, daemon=True).start()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stopped


class Health(BaseHTTPRequestHandler):
    url: str | None = None  # set by api(): /healthz is healthy only if this database answers

    def do_GET(self) -> None:
        if self.path != "/healthz":
            status, body = 404, b""
        elif self.url is None or database_answers(self.url):
            status, body = 200, b'{"status": "ok"}\n'
        else:
            status, body = 503, b'{"status": "database unreachable"}\n'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep the demo's output to the lines that matter


def api() -> int:
    try:
        Health.url, source = database_url()
    except NoUrl as exc:
        say("api", str(exc))
        return 1
    port = int(os.environ.get("PORT", "8000"))
    server = ThreadingHTTPServer(("0.0.0.0", port), Health)
    on_stop(server.shutdown)
    say("api", f"listening on :{port} (pid={os.getpid()}); GET /healthz; database URL: {source}")
    server.serve_forever(poll_interval=0.2)
    server.server_close()
    say("api", "stopped cleanly")
    return 0


def long_running(service: str) -> int:
    stopped = on_stop(None)
    try:
        _, source = database_url()
    except NoUrl as exc:
        say(service, str(exc))
        return 1
    say(service, f"started (pid={os.getpid()}); database URL: {source}; waiting for jobs")
    if service == "worker":
        return recording_worker(stopped)
    while not stopped.wait(30):
        say(service, "idle")
    say(service, "stopped cleanly")
    return 0


def recording_worker(stopped: threading.Event) -> int:
    """Pretend to download a call recording every 10 s, logging the worker events."""
    from prosaas_migrate import worker_events as events

    events.configure_logging(stream=sys.stdout)
    number = 0
    while True:
        number += 1
        call_sid, business_id = f"CA{number:032x}", 42
        events.picked("download_only", call_sid, business_id)
        events.slot_acquired(call_sid, business_id)
        events.download_done(call_sid, file=f"{call_sid}.mp3", size=1_234_567)
        events.release_slot(call_sid, business_id, reason="success")
        if stopped.wait(10):
            say("worker", "stopped cleanly")
            return 0


def healthcheck() -> int:
    url = f"http://127.0.0.1:{os.environ.get('PORT', '8000')}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return 0 if response.status == 200 else 1
    except OSError:
        return 1


def main(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    if command == "api":
        return api()
    if command in ("worker", "calls"):
        return long_running(command)
    if command == "healthcheck":
        return healthcheck()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
