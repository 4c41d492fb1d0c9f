"""The local stack's moto server: DynamoDB writes made atomic, state kept across restarts, a clean access log.

Atomic writes: DynamoDB evaluates a ConditionExpression and applies the write as one atomic step; moto 5.2
checks and writes without a lock, so two threads can both pass `attribute_not_exists(holder)`. Channel
leases, call claims and the webhook's one-lead-per-tranid all rest on that atomicity, so tests and the
local stack would otherwise show races that cannot happen in AWS (or hide real ones among them).
`patch()` serialises moto's DynamoDB operations (writes, and the reads that iterate its dicts) with one lock.

State (`--state-file`): moto keeps everything in memory, so a restart lost every lead, queued message and
recording. moto 5.2 offers no restore of its own (`/moto-api/data.json` is a read-only dump; its recorder
replays raw requests, which would receive SQS messages again and leave them in flight). So the server
pickles its backends when it is stopped and, while it runs, after requests that may have changed state:
once the server has been idle for IDLE_SECONDS, or every MAX_SNAPSHOT_AGE_SECONDS under a steady load. It
loads them at start. Requests hold a shared lock and a snapshot an exclusive one, so a snapshot never holds
half a request; an SQS long poll lets go of it while it waits. A message received but not yet deleted when
the snapshot was taken comes back after the restart: at least once, as in SQS. A crash (SIGKILL) loses at
most the changes since the last snapshot. (A snapshot every 0.25 s, as before, stopped every request for the
length of a pickle four times a second: under a burst that doubled the Tilda -> originate latency.)

Long polls of a client that is gone: the runner polls with 20-second long polls, as Lambda does. A runner
killed (or restarted by `make run`) leaves its polls waiting in moto, and one of them would take the next
message for a connection nobody reads, hiding it for the queue's visibility timeout. A poll whose client has
closed its connection now gives up before it takes a message (`ClientGone`).

Request counts: every request is counted by service and operation (`GET /_callbridge/requests`), so the
bench can state DynamoDB and SQS requests per lead; the same answer carries DynamoDB's capacity units
(infra/local/moto_capacity), which the bench prices.

Access log: werkzeug's shows each request's path; the query is replaced by its names (a presigned S3
link carries its signature there).

    python -m infra.local.moto_atomic -H 127.0.0.1 -p 5000 --state-file build/local/moto-state.pickle
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import functools
import io
import json
import os
import pickle
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

_LOCK = threading.RLock()
_SERIALISED = ("put_item", "update_item", "delete_item", "transact_write_items", "batch_write_item",
           # Reads too: moto iterates a table's dicts, and a write from another thread meanwhile raises
           # "dictionary changed size during iteration" (a Query over the channel slots under a burst).
           "get_item", "query", "scan", "batch_get_item", "transact_get_items")
SNAPSHOT_SECONDS = 0.25  # how often the keeper looks
IDLE_SECONDS = 1.0  # no request for this long: save what changed
MAX_SNAPSHOT_AGE_SECONDS = 15.0  # under a steady load, save at least this often
COUNTS_PATH = "/_callbridge/requests"
_CREDENTIAL_SCOPE = re.compile(r"Credential=[^/]*/[^/]*/[^/]*/([^/]+)/")
# Operations (the X-Amz-Target's last part) that change nothing worth keeping. ReceiveMessage does move a
# message in flight, but a snapshot without that only makes the message visible again after a restart.
_READ_PREFIXES = ("Get", "List", "Describe", "Query", "Scan", "BatchGet", "Receive")


def patch() -> None:
    from moto.dynamodb.models import DynamoDBBackend

    for name in _SERIALISED:
        method = getattr(DynamoDBBackend, name, None)
        if method is None or getattr(method, "_atomic", False):
            continue

        @functools.wraps(method)
        def atomic(self, *args, __method=method, **kwargs):
            with _LOCK:
                return __method(self, *args, **kwargs)

        atomic._atomic = True
        setattr(DynamoDBBackend, name, atomic)


class ClientGone(Exception):
    """The client of this request closed its connection."""


_CLIENT = threading.local()


def client_gone() -> bool:
    """True when this request's client has closed its connection (EOF waiting on its socket)."""
    sock = getattr(_CLIENT, "socket", None)
    if sock is None:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False  # open, nothing sent: the client is waiting for the answer
    except OSError:
        return True


def watch_clients(app):
    """WSGI middleware: the request's socket is where a long poll can see that its client is gone."""
    def application(environ, start_response):
        _CLIENT.socket = environ.get("werkzeug.socket")
        try:
            return app(environ, start_response)
        except ClientGone:
            start_response("499 Client Closed Request", [("Content-Length", "0")])
            return [b""]
        finally:
            _CLIENT.socket = None

    return application


def patch_long_poll_of_gone_clients() -> None:
    """A long poll checks its client before it waits and when it wakes: one that is gone takes no message."""
    from moto.sqs.models import Queue

    wait = Queue.wait_for_messages
    if getattr(wait, "_client_checked", False):
        return

    def wait_for_messages(queue, timeout):
        if client_gone():
            raise ClientGone
        wait(queue, timeout)
        if client_gone():
            raise ClientGone

    wait_for_messages._client_checked = True
    Queue.wait_for_messages = wait_for_messages


class SharedLock:
    """Many holders of the shared side (requests) or one of the exclusive side (a snapshot); a waiting
    exclusive holder goes first, so snapshots are not starved by a steady stream of requests."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0
        self._mine = threading.local()

    def held_shared(self) -> bool:
        return getattr(self._mine, "shared", 0) > 0

    def acquire_shared(self) -> None:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        self._mine.shared = getattr(self._mine, "shared", 0) + 1

    def release_shared(self) -> None:
        self._mine.shared -= 1
        with self._cond:
            self._shared -= 1
            if not self._shared:
                self._cond.notify_all()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        self.acquire_shared()
        try:
            yield
        finally:
            self.release_shared()

    @contextlib.contextmanager
    def exclusive(self, timeout: float) -> Iterator[bool]:
        """Yields False (holding nothing) when the shared holders do not let go within `timeout`."""
        with self._cond:
            self._waiting += 1
            got = self._cond.wait_for(lambda: not self._shared and not self._exclusive, timeout)
            self._waiting -= 1
            if got:
                self._exclusive = True
            else:
                self._cond.notify_all()  # requests held back by our wait may go on
        try:
            yield got
        finally:
            if got:
                with self._cond:
                    self._exclusive = False
                    self._cond.notify_all()


class _Pickler(pickle.Pickler):
    """Pickles moto's models: locks and conditions become fresh ones, KMS keys travel as DER."""

    def reducer_override(self, obj):
        if isinstance(obj, threading.Condition):
            return threading.Condition, ()
        kind = type(obj)
        if kind is _thread.LockType:
            return threading.Lock, ()
        if kind is _thread.RLock or kind is type(threading.RLock()):
            return threading.RLock, ()
        if kind.__module__.startswith("cryptography") and hasattr(obj, "private_bytes"):
            from cryptography.hazmat.primitives import serialization

            der = obj.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            return _load_private_key, (der,)
        return NotImplemented


def _load_private_key(der: bytes):
    from cryptography.hazmat.primitives import serialization

    return serialization.load_der_private_key(der, password=None)


def _changes_state(environ: dict) -> bool:
    if environ.get("REQUEST_METHOD") in ("GET", "HEAD", "OPTIONS"):
        return False
    operation = (environ.get("HTTP_X_AMZ_TARGET") or "").rsplit(".", 1)[-1]
    return not (operation and operation.startswith(_READ_PREFIXES))


class RequestCounts:
    """WSGI middleware counting requests by (service, operation); answers COUNTS_PATH itself."""

    def __init__(self, app):
        self.app = app
        self._lock = threading.Lock()
        self.counts: dict[str, dict[str, int]] = {}

    @staticmethod
    def _operation(environ: dict) -> tuple[str, str]:
        match = _CREDENTIAL_SCOPE.search(environ.get("HTTP_AUTHORIZATION") or "")
        service = match.group(1) if match else "unsigned"
        target = environ.get("HTTP_X_AMZ_TARGET")
        if target:
            return service, target.rsplit(".", 1)[-1]
        if environ.get("REQUEST_METHOD") == "POST" and "x-www-form-urlencoded" in (environ.get("CONTENT_TYPE") or ""):
            # The query protocol (SNS, STS, CloudFormation): the operation is the body's Action.
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length) if length else b""
            environ["wsgi.input"] = io.BytesIO(body)
            action = re.search(rb"(?:^|&)Action=([A-Za-z]+)", body)
            if action:
                return service, action.group(1).decode()
        return service, environ.get("REQUEST_METHOD", "?")  # S3's REST operations: counted by method

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") == COUNTS_PATH:
            from infra.local import moto_capacity

            with self._lock:
                units = {kind: ops for kind, ops in moto_capacity.snapshot().items() if ops}
                body = json.dumps({**self.counts, **units}).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        service, operation = self._operation(environ)
        with self._lock:
            by_service = self.counts.setdefault(service, {})
            by_service[operation] = by_service.get(operation, 0) + 1
        return self.app(environ, start_response)


class Snapshots:
    """moto's backends saved to and loaded from one file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock = SharedLock()
        self._count_lock = threading.Lock()
        self.changes = 0
        self.saved = 0
        self.last_request = time.monotonic()
        self.last_save = time.monotonic()
        self._warned: set[str] = set()

    def wsgi(self, app):
        def application(environ, start_response):
            changes = _changes_state(environ)
            with self.lock.shared():
                result = app(environ, start_response)
                try:
                    body = list(result)  # the whole answer inside the lock: nothing of it runs after a snapshot
                finally:
                    if hasattr(result, "close"):
                        result.close()
                if changes:
                    with self._count_lock:
                        self.changes += 1
                    self.last_request = time.monotonic()  # reads (the runner's polls never stop) keep no one busy
            return body

        return application

    def patch_long_poll(self) -> None:
        """An SQS long poll waits without the shared lock (a snapshot would otherwise wait for it)."""
        from moto.sqs.models import Queue

        wait = Queue.wait_for_messages
        if getattr(wait, "_lets_go", False):
            return
        lock = self.lock

        def wait_for_messages(queue, timeout):
            if not lock.held_shared():
                return wait(queue, timeout)
            lock.release_shared()
            try:
                return wait(queue, timeout)
            finally:
                lock.acquire_shared()

        wait_for_messages._lets_go = True
        Queue.wait_for_messages = wait_for_messages

    def _state(self) -> dict:
        from moto.core.base_backend import BackendDict

        return {bd.service_name: {account: dict(regions) for account, regions in bd.items()}
                for bd in BackendDict._instances}

    def save(self, timeout: float = 5.0) -> bool:
        import moto

        with self.lock.exclusive(timeout) as got:
            if not got:
                return False
            changes = self.changes
            backends = {}
            for service, accounts in self._state().items():
                buffer = io.BytesIO()
                try:
                    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(accounts)
                except Exception as exc:  # one service that cannot be kept must not cost the others
                    if service not in self._warned:
                        self._warned.add(service)
                        print(f"moto state: {service} is not kept: {type(exc).__name__}: {exc}", file=sys.stderr,
                              flush=True)
                    continue
                backends[service] = buffer.getvalue()
        data = pickle.dumps({"moto": moto.__version__, "backends": backends}, protocol=pickle.HIGHEST_PROTOCOL)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)  # a crash mid-write leaves the previous snapshot whole
        self.saved = changes
        self.last_save = time.monotonic()
        return True

    def load(self) -> bool:
        """Restore the saved backends (before serving). False when there is no saved state."""
        import moto
        from moto.backends import get_backend

        if not self.path.exists():
            return False
        data = pickle.loads(self.path.read_bytes())  # noqa: S301 - our own file, written by save()
        if data.get("moto") != moto.__version__:
            raise RuntimeError(f"{self.path} was saved by moto {data.get('moto')}, this is moto {moto.__version__}: "
                               "remove it or run `make run FRESH=1`")
        for service, blob in data["backends"].items():
            accounts = pickle.loads(blob)  # noqa: S301 - as above
            backend_dict = get_backend(service)
            for account, regions in accounts.items():
                by_region = backend_dict[account]
                for region, backend in regions.items():
                    dict.__setitem__(by_region, region, backend)
        return True

    def due(self, now: float | None = None) -> bool:
        """Something changed, and no change came for IDLE_SECONDS or the last snapshot is old."""
        now = time.monotonic() if now is None else now
        if self.changes == self.saved:
            return False
        return now - self.last_request >= IDLE_SECONDS or now - self.last_save >= MAX_SNAPSHOT_AGE_SECONDS

    def keep(self, stop: threading.Event) -> None:
        while not stop.wait(SNAPSHOT_SECONDS):
            if self.due():
                try:
                    self.save()
                except Exception as exc:
                    print(f"moto state: not saved: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="moto server for the local stack")
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=int(os.environ.get("MOTO_PORT", 5000)))
    parser.add_argument("--state-file", help="keep the state here across restarts (none: in memory only)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MOTO_PORT", str(args.port))  # moto builds queue URLs from it

    from infra.local import moto_capacity, moto_speed, moto_transactions

    moto_capacity.patch()  # capacity units as DynamoDB bills them, under the lock patch() puts around it
    patch()

    moto_transactions.patch()  # a transaction's rollback copies its items, not the whole table (the burst's cost)
    moto_speed.patch()  # a Query reads its partition, not the whole table sorted (the burst's other cost)
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    from infra.local.run import loggable_path

    class Handler(MotoRequestHandler):
        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            self.log("info", '"%s %s %s" %s %s', self.command, loggable_path(getattr(self, "path", "") or ""),
                     self.request_version, code, size)

    app = DomainDispatcherApplication(create_backend_app)
    app.debug = True
    snapshots = Snapshots(args.state_file) if args.state_file else None
    if snapshots is not None:
        try:
            loaded = snapshots.load()
        except Exception as exc:
            print(f"moto state: cannot load {args.state_file}: {exc}", file=sys.stderr, flush=True)
            return 2
        print(f"moto state: {'loaded from' if loaded else 'new, kept in'} {args.state_file}", file=sys.stderr,
              flush=True)
        snapshots.patch_long_poll()
        app = snapshots.wsgi(app)
    patch_long_poll_of_gone_clients()
    app = RequestCounts(watch_clients(app))

    server = make_server(args.host, args.port, app, threaded=True, request_handler=Handler)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    serving = threading.Thread(target=server.serve_forever, name="moto-server", daemon=True)
    serving.start()
    keeper = None
    if snapshots is not None:
        keeper = threading.Thread(target=snapshots.keep, args=(stop,), name="moto-state", daemon=True)
        keeper.start()
    print(f" * Running on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    if keeper is not None:
        keeper.join()
        if snapshots.changes != snapshots.saved and not snapshots.save(timeout=10):
            print("moto state: the last changes were not saved (requests did not finish)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
