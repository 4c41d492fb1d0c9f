"""`make run`: the whole system on this machine, with no AWS or provider account (R-26).

Starts, in order: a moto server (unless AWS_ENDPOINT_URL names one), the AWS resources from
infra/template.yaml, the SalesRender sandbox (unless SALESRENDER_API_URL is set), the Beeline sandbox
(unless BEELINE_API_URL is set; BEELINE_SANDBOX_TIME_SCALE compresses its calls, BEELINE_SANDBOX_TALK_SECONDS
and BEELINE_SANDBOX_EXTRA_ABONENTS set talk times and operators for the bench), the Chalice app
(`chalice local`), and the runner that feeds SQS messages and schedules to the handlers. Prints one
line per service, then `ready` once GET /v1/health answers 200. Stays in the foreground; SIGINT or
SIGTERM stops every process it started. Needs no terminal: the end-to-end tests start it.

A child that dies is started again after a short backoff; one that dies more than MAX_RESTARTS times
within RESTART_WINDOW_SECONDS stops the stack with the reason (and, for children that log to a file,
the end of that log). The local state lives in CALLBRIDGE_LOCAL_DIR (build/local): the moto server
and the sandboxes save theirs there and load it on start, so leads, orders and calls survive a
restart of a child or of `make run`. `make run FRESH=1` (`--fresh`) removes it first.

One configuration document per run: CALLBRIDGE_CONFIG (default config/local.yaml) is validated before anything
starts (a bad key stops `make run` with the key's name), and the app, the runner's workers and its schedules
all get it by absolute path; inside `chalice local` the stage's variables in .chalice/config.json do not
override it (PINNED_ENV). The app's server takes bursts: a listen backlog of REQUEST_QUEUE_SIZE.

Secrets never reach a log line: the app's access log (chalice local) shows paths without their query
values and without the Beeline webhook secret (see `loggable_path`).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import urlopen

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
LOG_DIR = Path(os.environ.get("CALLBRIDGE_LOCAL_DIR") or ROOT / "build" / "local")
# What each stateful child keeps between runs, in LOG_DIR.
STATE_FILES = {"moto": "moto-state.pickle", "salesrender": "salesrender-state.json", "beeline": "beeline-state.json"}
MAX_RESTARTS = 5
RESTART_WINDOW_SECONDS = 300
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 8.0

# Embedded defaults for the local stack only: dummy credentials of the sandboxes, not secrets.
LOCAL_DEFAULTS = {
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "local",
    "AWS_SECRET_ACCESS_KEY": "local",
    "CALLBRIDGE_STAGE": "local",
    "CALLBRIDGE_CONFIG": "config/local.yaml",
    "TILDA_API_KEY": "local-tilda-key",
    "SALESRENDER_API_TOKEN": "sandbox-salesrender-token",
    "SALESRENDER_COMPANY_ID": "1",
    "BEELINE_API_TOKEN": "sandbox-beeline-token",
    "BEELINE_WEBHOOK_SECRET": "local-beeline-secret",
    "SALESRENDER_WEBHOOK_SECRET": "local-salesrender-secret",
    "CALLBRIDGE_API_TOKEN": "local-api-token",
    "RECORDING_LINK_SECRET": "local-recording-link-secret",
    "PLUGIN_ENCRYPTION_KEY": "local-plugin-encryption-key",
    "POWERTOOLS_METRICS_NAMESPACE": "callbridge",
}

# Path segments after these prefixes are secrets (the Beeline webhook's shared secret).
_SECRET_PATH = re.compile(r"^(/webhooks/[^/]+/)[^/?]+")


def loggable_path(path: str) -> str:
    """A request target as an access log may show it: query values and path secrets replaced by `***`.

    `?key=` (Tilda's key), `?sig=` (recording links), presigned S3 signatures and tokens all travel in
    queries; `/webhooks/beeline/{secret}` carries the secret in the path.
    """
    parts = urlsplit(path)
    shown = _SECRET_PATH.sub(r"\1***", parts.path)
    if parts.query:
        items = [item.partition("=") for item in parts.query.split("&") if item]
        shown += "?" + "&".join(f"{name[:40]}=***" if sep else name[:40] for name, sep, _ in items)
    from functions.core.phones import redact  # a phone typed into a path (GET /v1/leads/+7...) is masked too

    return redact(shown)


# What the run decided for every process: the stage's variables in .chalice/config.json must not override them
# inside `chalice local` (they would: Chalice applies them over the environment when it loads the app).
PINNED_ENV = ("CALLBRIDGE_CONFIG", "CALLBRIDGE_STAGE")
# The app's listen backlog: socketserver's default of 5 reset connections beyond ~15 concurrent posts.
REQUEST_QUEUE_SIZE = 1024


def chalice_local() -> int:
    """`chalice local` (arguments from sys.argv) with an access log that never shows a secret, the run's
    configuration document and stage (PINNED_ENV), and a listen backlog for bursts of webhooks."""
    from http.server import BaseHTTPRequestHandler

    from chalice import local
    from chalice.cli import factory, main

    def log_request(self: BaseHTTPRequestHandler, code: int | str = "-", size: int | str = "-") -> None:
        target = loggable_path(getattr(self, "path", "") or "")
        started = getattr(self, "_callbridge_started", None)
        took = ""
        if started is not None:  # wall, and the request thread's CPU (the bench prices both)
            cpu = time.thread_time() - self._callbridge_cpu
            took = f" {(time.perf_counter() - started) * 1000:.1f}ms cpu {cpu * 1000:.1f}ms"
        self.log_message('"%s %s %s" %s %s%s', self.command, target, self.request_version, code, size, took)

    generic_handle = local.ChaliceRequestHandler._generic_handle

    def timed_handle(self) -> None:
        # The access log's duration: what API Gateway's Lambda would bill for this request (the bench reads it).
        self._callbridge_started, self._callbridge_cpu = time.perf_counter(), time.thread_time()
        generic_handle(self)

    local.ChaliceRequestHandler.log_request = log_request
    for method in ("GET", "PUT", "POST", "HEAD", "DELETE", "PATCH", "OPTIONS"):  # bound to _generic_handle by name
        setattr(local.ChaliceRequestHandler, f"do_{method}", timed_handle)
    local.ThreadedHTTPServer.request_queue_size = REQUEST_QUEUE_SIZE
    pinned = {k for k in PINNED_ENV if os.environ.get(k)}
    load_chalice_app = factory.CLIFactory.load_chalice_app

    def load_with_pinned_env(self, environment_variables=None, *args, **kwargs):
        if environment_variables is not None:
            environment_variables = {k: v for k, v in environment_variables.items() if k not in pinned}
        return load_chalice_app(self, environment_variables, *args, **kwargs)

    factory.CLIFactory.load_chalice_app = load_with_pinned_env
    return main()


def check_config(env: dict) -> Path:
    """The run's one configuration document, validated before anything starts; its absolute path.

    Raises RuntimeError naming the bad key (functions/core/config.py's messages), so `make run` refuses to
    start instead of reporting ready and then retrying a ConfigError for every lead."""
    from functions.core import config

    path = Path(env.get("CALLBRIDGE_CONFIG") or config.DEFAULT_CONFIG)
    path = path if path.is_absolute() else ROOT / path
    try:
        config.parse(path.read_text(encoding="utf-8"), str(path))
    except OSError as exc:
        raise RuntimeError(f"CALLBRIDGE_CONFIG: cannot read {path}: {exc.strerror}") from None
    except config.ConfigError as exc:
        raise RuntimeError(f"configuration is invalid, nothing started: {exc}") from None
    return path


def wait_for(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        try:
            with urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) != 0


def clear_state(directory: Path = LOG_DIR) -> list[str]:
    """Remove the saved local state (what `FRESH=1` asks for); returns the names removed."""
    removed = []
    for name in STATE_FILES.values():
        path = directory / name
        if path.exists():
            path.unlink()
            removed.append(name)
    return removed


@dataclass
class Child:
    name: str
    args: list[str]
    ready_url: str | None = None
    ready_timeout: float = 30.0
    quiet: bool = False  # writes to LOG_DIR/<name>.log instead of make run's output
    proc: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return LOG_DIR / f"{self.name}.log"


class Stack:
    def __init__(self):
        self.children: list[Child] = []
        self.env = {**LOCAL_DEFAULTS, **os.environ}
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self.env["PYTHONUNBUFFERED"] = "1"

    def spawn(self, child: Child) -> subprocess.Popen:
        # A process group of its own: a Ctrl-C in a terminal reaches us once, and we stop the children.
        # A quiet child appends to its log, so what a crashed one said before a restart is kept.
        out = child.log_path.open("a") if child.quiet else None
        try:
            child.proc = subprocess.Popen(child.args, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                          start_new_session=True, stdout=out, stderr=out)
        finally:
            if out is not None:
                out.close()  # the child has its own copy
        return child.proc

    def start_child(self, child: Child) -> None:
        if child not in self.children:
            self.children.append(child)
        proc = self.spawn(child)
        if child.ready_url:
            try:
                wait_for(child.ready_url, child.ready_timeout, proc)
            except RuntimeError as exc:
                raise RuntimeError(f"{child.name}: {exc}{self.log_tail(child)}") from None

    def log_tail(self, child: Child, lines: int = 10) -> str:
        if not child.quiet or not child.log_path.exists():
            return ""
        tail = child.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "".join(f"\n  {child.name}.log: {line}" for line in tail)

    def start(self, fresh: bool = False) -> None:
        py = sys.executable
        # One document for the app, the runner's workers and schedules alike, by absolute path.
        self.env["CALLBRIDGE_CONFIG"] = str(check_config(self.env))
        shown_config = os.path.relpath(self.env["CALLBRIDGE_CONFIG"], ROOT)
        print(f"configuration: {shown_config if not shown_config.startswith('..') else self.env['CALLBRIDGE_CONFIG']}"
              " (valid; used by the app, the workers and the schedules)", flush=True)
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        shown = os.path.relpath(LOG_DIR, ROOT) if LOG_DIR.is_relative_to(ROOT) else str(LOG_DIR)
        if fresh:
            removed = clear_state()
            print(f"local state: fresh start ({', '.join(removed) or 'nothing saved'} removed from {shown})",
                  flush=True)
        else:
            print(f"local state: kept in {shown} between runs (make run FRESH=1 starts empty)", flush=True)

        if not self.env.get("AWS_ENDPOINT_URL"):
            port = int(self.env.get("MOTO_PORT", "5000"))
            if not port_free(port):
                raise RuntimeError(f"port {port} is taken: set MOTO_PORT, or AWS_ENDPOINT_URL to use that server")
            self.env["AWS_ENDPOINT_URL"] = f"http://{HOST}:{port}"
            self.start_child(Child("moto", [py, "-m", "infra.local.moto_atomic", "-H", HOST, "-p", str(port),
                                            "--state-file", str(LOG_DIR / STATE_FILES["moto"])],
                                   ready_url=f"{self.env['AWS_ENDPOINT_URL']}/moto-api/", quiet=True))
            print(f"moto server (AWS): {self.env['AWS_ENDPOINT_URL']} (log: {shown}/moto.log)", flush=True)
        else:
            print(f"moto server (AWS): {self.env['AWS_ENDPOINT_URL']} (external)", flush=True)

        os.environ.update(self.env)  # the stack deploy below runs in this process
        from infra.local import stack

        self.env.update(stack.deploy(self.env["AWS_ENDPOINT_URL"], stage=self.env["CALLBRIDGE_STAGE"]))
        print(f"aws resources: stack callbridge-{self.env['CALLBRIDGE_STAGE']} from infra/template.yaml "
              f"(table {self.env['STATE_TABLE']}, bucket {self.env['RECORDINGS_BUCKET']})", flush=True)

        if not os.environ.get("SALESRENDER_API_URL"):
            port = int(self.env.get("SALESRENDER_SANDBOX_PORT", "8101"))
            self.start_child(Child("salesrender", [
                py, "-m", "infra.local.salesrender_sandbox", "--host", HOST, "--port", str(port),
                "--token", self.env["SALESRENDER_API_TOKEN"], "--company-id", self.env["SALESRENDER_COMPANY_ID"],
                "--quiet", "--state-file", str(LOG_DIR / STATE_FILES["salesrender"])],
                ready_url=f"http://{HOST}:{port}/_sandbox/health"))
            self.env["SALESRENDER_API_URL"] = f"http://{HOST}:{port}/companies/{self.env['SALESRENDER_COMPANY_ID']}/CRM"
        else:
            print(f"salesrender: {self.env['SALESRENDER_API_URL']} (external, no sandbox)", flush=True)

        if not os.environ.get("BEELINE_API_URL"):
            port = int(self.env.get("BEELINE_SANDBOX_PORT", "8102"))
            self.start_child(Child("beeline", [
                py, "-m", "infra.local.beeline_sandbox", "--host", HOST, "--port", str(port),
                "--token", self.env["BEELINE_API_TOKEN"], "--quiet",
                "--time-scale", self.env.get("BEELINE_SANDBOX_TIME_SCALE", "1"),
                # The bench's: talk times of 1-3 minutes (LOW-HIGH) and more operators than the default three.
                *(["--talk-seconds", self.env["BEELINE_SANDBOX_TALK_SECONDS"]]
                  if self.env.get("BEELINE_SANDBOX_TALK_SECONDS") else []),
                "--extra-abonents", self.env.get("BEELINE_SANDBOX_EXTRA_ABONENTS", "0"),
                "--state-file", str(LOG_DIR / STATE_FILES["beeline"])],
                ready_url=f"http://{HOST}:{port}/_sandbox/health"))
            self.env["BEELINE_API_URL"] = f"http://{HOST}:{port}/apis/portal/"
        else:
            print(f"beeline: {self.env['BEELINE_API_URL']} (external, no sandbox)", flush=True)

        app_port = int(self.env.get("CALLBRIDGE_PORT", "8000"))
        self.env.setdefault("PUBLIC_BASE_URL", f"http://{HOST}:{app_port}")
        chalice = [py, "-c", "import sys; from infra.local.run import chalice_local; sys.exit(chalice_local())"]
        self.start_child(Child("app", [*chalice, "local", "--host", HOST, "--port", str(app_port), "--stage", "local",
                                       "--no-autoreload"],
                               ready_url=f"http://{HOST}:{app_port}/v1/health", ready_timeout=60))
        print(f"callbridge app: http://{HOST}:{app_port} (Tilda webhook: /webhooks/tilda)", flush=True)

        self.start_child(Child("runner", [py, "-m", "infra.local.runner"]))
        print("runner: delivering SQS messages and schedules to the app's handlers", flush=True)
        print("ready", flush=True)

    def stop(self) -> None:
        # Newest first, one at a time: the runner and the app finish their calls while moto still answers,
        # and moto, stopped last, saves a state that holds everything they did.
        for child in reversed(self.children):
            proc = child.proc
            if proc is None:
                continue
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def restart(self, child: Child, code: int, stopping) -> bool:
        """Start a dead child again after a backoff; False when it died too often (the stack stops)."""
        now = time.monotonic()
        child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW_SECONDS]
        if len(child.restarts) >= MAX_RESTARTS:
            print(f"{child.name} exited with {code}: restarted {MAX_RESTARTS} times within "
                  f"{RESTART_WINDOW_SECONDS} s, stopping{self.log_tail(child)}", file=sys.stderr, flush=True)
            return False
        child.restarts.append(now)
        delay = min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** (len(child.restarts) - 1))
        print(f"{child.name} exited with {code}: restarting in {delay:.1f} s "
              f"({len(child.restarts)}/{MAX_RESTARTS}){self.log_tail(child, 5)}", file=sys.stderr, flush=True)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            if stopping():
                return True
            time.sleep(0.1)
        try:
            self.start_child(child)
        except RuntimeError as exc:  # it died again while starting: the next look counts another restart
            print(f"{child.name} did not come back: {exc}", file=sys.stderr, flush=True)
            return True
        print(f"{child.name}: restarted", file=sys.stderr, flush=True)
        return True

    def watch(self, stopping) -> int:
        while not stopping():
            for child in self.children:
                code = child.proc.poll() if child.proc is not None else None
                if code is not None and not stopping() and not self.restart(child, code, stopping):
                    return 1
            time.sleep(0.2)
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The whole callbridge system on this machine.")
    parser.add_argument("--fresh", action="store_true", default=os.environ.get("FRESH", "") not in ("", "0"),
                        help="start with empty local state (FRESH=1)")
    args = parser.parse_args(argv)
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: received.append(signum))
    stack = Stack()
    try:
        stack.start(fresh=args.fresh)
        code = stack.watch(lambda: bool(received))
    except Exception as exc:
        print(f"make run failed: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        stack.stop()
    print("stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
