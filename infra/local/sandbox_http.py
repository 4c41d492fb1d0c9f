"""HTTP server plumbing shared by the local provider sandboxes (SalesRender, Beeline).

Both sandboxes serve a handler from a background `ThreadingHTTPServer`, read request bodies under the same
strict rules (Content-Length only, bounded size), log only method, path and status, and run the same
`python -m` loop (serve until SIGINT/SIGTERM, then stop). They also answer the `/_sandbox/` control
endpoints they have in common (health, faults, reset) the same way. Keeping that here means the two cannot
drift apart; each sandbox brings only its routes, its error bodies and any work of its own on start or stop.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self
from urllib.parse import SplitResult, unquote, urlsplit


class SandboxError(Exception):
    """A control-endpoint error carrying the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def allow_methods(method: str, *allowed: str) -> None:
    """Raise a 405 SandboxError unless a control endpoint takes `method`."""
    if method not in allowed:
        raise SandboxError(405, f"use {' or '.join(allowed)}")


def json_object(body: bytes) -> dict[str, Any]:
    """A control endpoint's JSON object body (empty means {}); a 400 SandboxError otherwise."""
    try:
        value = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise SandboxError(400, "body is not valid JSON") from None
    if not isinstance(value, dict):
        raise SandboxError(400, "body must be a JSON object")
    return value


class SandboxResponse(Protocol):
    """What a sandbox handler answers: both sandboxes' `_Response` classes have these attributes."""

    status: int
    body: bytes
    content_type: str | None
    close: bool


class SandboxHandler(BaseHTTPRequestHandler):
    """Request handler base: reads the body, routes `/_sandbox/...` to `sandbox.handle_control`, everything
    else to `_route`, answers 500 on an unexpected exception, and logs (when `sandbox.verbose`) nothing but
    method, `_masked_path(path)` and status: queries, headers and bodies carry tokens and phone numbers."""

    protocol_version = "HTTP/1.1"
    timeout = 60  # idle keep-alive connections must not pin threads forever
    log_name: ClassVar[str]  # prefix of stderr lines, e.g. "beeline sandbox"
    max_body_bytes: ClassVar[int] = 1 << 20
    sandbox: Any  # set by SandboxServer.start() on a per-server subclass

    def _masked_path(self, path: str) -> str:
        """The path as it may be logged (never the query)."""
        return path

    def _bad_request(self, status: int, message: str) -> SandboxResponse:
        """The answer to a request whose body cannot be read (411, 413 or 400); the connection is then closed."""
        raise NotImplementedError

    def _route(self, method: str, url: SplitResult, body: bytes) -> SandboxResponse:
        """The answer to a request outside `/_sandbox/`."""
        raise NotImplementedError

    def _internal_error(self, exc: Exception) -> SandboxResponse:
        """Log an unexpected exception (without personal data) and return the 500 answer."""
        raise NotImplementedError

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self._log_path = self._masked_path(url.path)
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self._send(self._bad_request(411, "Content-Length required"), close=True)
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > self.max_body_bytes:
            self._send(self._bad_request(413 if length > 0 else 400, "Bad Content-Length"), close=True)
            return
        # Read the body before answering anything so a keep-alive connection stays in sync.
        body = self.rfile.read(length) if length else b""
        try:
            if url.path == "/_sandbox" or url.path.startswith("/_sandbox/"):
                response = self.sandbox.handle_control(method, url.path, body)
            else:
                response = self._route(method, url, body)
        except Exception as exc:
            response = self._internal_error(exc)
        self._send(response)

    def _send(self, response: SandboxResponse, *, close: bool = False) -> None:
        self.send_response(response.status)
        if response.content_type:
            self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        if close or response.close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(response.body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if self.sandbox.verbose:
            path = getattr(self, "_log_path", "?")
            sys.stderr.write(f"{self.log_name}: {self.command} {path} {code}\n")

    def log_message(self, format: str, *args: Any) -> None:
        pass


class SandboxServer:
    """Start/stop a sandbox's HTTP server in a daemon thread; also usable as `with Sandbox(...) as sb`.

    `start()` serves a fresh subclass of `handler` whose `sandbox` attribute is this instance, so handlers
    of several sandboxes in one process never share state. Port 0 picks a free port (see `port`).
    """

    verbose: bool  # read by SandboxHandler.log_request
    # The sandbox's response type, called as json_response(status, body): the JSON content types differ.
    json_response: ClassVar[Callable[[int, Any], SandboxResponse]]
    fault_keys: ClassVar[frozenset[str]]  # what POST /_sandbox/faults may set: the parameters of add_fault
    fault_methods: ClassVar[tuple[str, ...]] = ("GET", "POST")  # with "DELETE", DELETE calls clear_faults
    unquote_control_path: ClassVar[bool] = False  # decode %XX in control path segments before matching

    def __init__(self, host: str, port: int, *, handler: type[SandboxHandler], thread_name: str):
        self.host = host
        self._port = port
        self._handler = handler
        self._thread_name = thread_name
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _before_start(self) -> None:
        """Hook: runs in `start()` just before the server binds (not when already started)."""

    def _before_shutdown(self) -> None:
        """Hook: runs first in every `stop()`, even when the server is not running."""

    def start(self) -> Self:
        if self._server is not None:
            return self
        handler = type("Handler", (self._handler,), {"sandbox": self})
        self._before_start()
        self._server = ThreadingHTTPServer((self.host, self._port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=self._thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._before_shutdown()
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server is not None else self._port

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    @property
    def api_url(self) -> str:
        """The URL clients are configured with; sandboxes override it when their API lives under a path."""
        return self.base_url

    # ---- /_sandbox/ control endpoints ------------------------------------------------------------------

    def _control_views(self) -> Mapping[str, Callable[[], Any]]:
        """Hook: read-only control endpoints, `GET /_sandbox/<name>` answering `view()` as JSON."""
        return {}

    def _control_route(self, method: str, parts: list[str], body: bytes) -> SandboxResponse | None:
        """Hook: answer a control path (`parts` after "_sandbox") this sandbox adds, or None if it has none."""
        return None

    def faults(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def add_fault(self, count: int = 1, **spec: Any) -> dict[str, Any]:
        """Queue a fault; raises ValueError for a bad spec."""
        raise NotImplementedError

    def clear_faults(self) -> None:
        """Needed only when `fault_methods` has "DELETE"."""
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """What survives a restart of the sandbox (`--state-file`), as JSON-able data."""
        raise NotImplementedError

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Take over a `state()` saved by an earlier run (before `start()`)."""
        raise NotImplementedError

    def handle_control(self, method: str, path: str, body: bytes) -> SandboxResponse:
        """Answer `/_sandbox/...`: health, faults, reset and `_control_views` here, the rest via `_control_route`.

        No auth. A SandboxError becomes `{"error": message}` with its status; an unknown path is a 404.
        """
        parts = [p for p in path.split("/") if p][1:]  # drop "_sandbox"
        if self.unquote_control_path:
            parts = [unquote(p) for p in parts]
        try:
            if parts == ["health"]:
                allow_methods(method, "GET")
                return self.json_response(200, {"ok": True})
            if parts == ["faults"]:
                return self._faults_control(method, body)
            if parts == ["reset"]:
                allow_methods(method, "POST")
                self.reset()
                return self.json_response(200, {"ok": True})
            view = self._control_views().get(parts[0]) if len(parts) == 1 else None
            if view is not None:
                allow_methods(method, "GET")
                return self.json_response(200, view())
            response = self._control_route(method, parts, body)
        except SandboxError as exc:
            return self.json_response(exc.status, {"error": str(exc)})
        return response if response is not None else self.json_response(404, {"error": "not found"})

    def _faults_control(self, method: str, body: bytes) -> SandboxResponse:
        allow_methods(method, *self.fault_methods)
        if method == "GET":
            return self.json_response(200, self.faults())
        if method == "DELETE":
            self.clear_faults()
            return self.json_response(200, [])
        spec = json_object(body)
        # Reject unknown keys here: passed on to add_fault they would be a TypeError, i.e. a 500.
        unknown = set(spec) - self.fault_keys
        if unknown:
            raise SandboxError(400, f"unknown fault keys: {sorted(unknown)}")
        try:
            return self.json_response(200, self.add_fault(**spec))
        except ValueError as exc:
            raise SandboxError(400, str(exc)) from None


class StateFile:
    """A sandbox's `state()` kept in a JSON file: loaded at start, written soon after it changes and at stop,
    so the local stack's orders and calls survive a restart (the write replaces the file whole)."""

    interval = 0.25  # seconds between looks for a change

    def __init__(self, sandbox: SandboxServer, path: str | os.PathLike):
        self.sandbox = sandbox
        self.path = Path(path)
        self._last: str | None = None

    def load(self) -> bool:
        if not self.path.exists():
            return False
        text = self.path.read_text(encoding="utf-8")
        self.sandbox.load_state(json.loads(text))
        self._last = text
        return True

    def save(self) -> bool:
        text = json.dumps(self.sandbox.state(), ensure_ascii=False, sort_keys=True)
        if text == self._last:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.path)
        self._last = text
        return True

    def keep(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            try:
                self.save()
            except Exception as exc:  # keep serving; the next look tries again
                sys.stderr.write(f"state not saved to {self.path.name}: {type(exc).__name__}\n")


def serve_until_signalled(sandbox: SandboxServer, name: str, state_file: str | os.PathLike | None = None) -> int:
    """The `python -m` loop: start, print "<name>: <api_url>", serve until SIGINT/SIGTERM, stop.

    With `state_file`, the state saved there is loaded first and kept up to date (see StateFile).
    Returns the exit status: 0 after a signal, 1 when the port cannot be bound, 2 when the saved state
    cannot be read (reported on stderr).
    """
    stop = threading.Event()
    # Only set a flag in the handler; the main loop shuts the server down outside signal context.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    store = StateFile(sandbox, state_file) if state_file else None
    if store is not None:
        try:
            store.load()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"{name}: cannot load the state in {state_file} ({type(exc).__name__}: {exc}): remove it or "
                  "run `make run FRESH=1`", file=sys.stderr)
            return 2
    try:
        sandbox.start()
    except OSError as exc:
        print(f"{name}: cannot listen on {sandbox.host}:{sandbox.port}: {exc}", file=sys.stderr)
        return 1
    print(f"{name}: {sandbox.api_url}", flush=True)
    keeper = None
    if store is not None:
        keeper = threading.Thread(target=store.keep, args=(stop,), name=f"{name} state", daemon=True)
        keeper.start()
    try:
        while not stop.wait(0.2):
            pass
    finally:
        stop.set()
        sandbox.stop()
        if keeper is not None:
            keeper.join()
            store.save()
    return 0
