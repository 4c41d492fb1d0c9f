"""`make run`: the whole system on this machine, with no AWS or provider account (R-26).

Starts, in order: a moto server (unless AWS_ENDPOINT_URL names one), the AWS resources from
infra/template.yaml, the SalesRender sandbox (unless SALESRENDER_API_URL is set), the Beeline sandbox
(unless BEELINE_API_URL is set; BEELINE_SANDBOX_TIME_SCALE compresses its calls), the Chalice app
(`chalice local`), and the runner that feeds SQS messages and schedules to the handlers. Prints one
line per service, then `ready` once GET /v1/health answers 200. Stays in the foreground; SIGINT or
SIGTERM stops every process it started. If any child dies, everything is stopped and the exit code
is 1. Needs no terminal: the end-to-end test starts it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
LOG_DIR = ROOT / "build" / "local"

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
    "POWERTOOLS_METRICS_NAMESPACE": "callbridge",
}


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


class Stack:
    def __init__(self):
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.env = {**LOCAL_DEFAULTS, **os.environ}
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self.env["PYTHONUNBUFFERED"] = "1"

    def spawn(self, name: str, args: list[str], quiet: bool = False) -> subprocess.Popen:
        # A process group of its own: a Ctrl-C in a terminal reaches us once, and we stop the children.
        # A quiet child (moto's access log) writes to build/local/<name>.log instead of the terminal.
        out = None
        if quiet:
            LOG_DIR.mkdir(parents=True, exist_ok=True)
            out = (LOG_DIR / f"{name}.log").open("w")
        proc = subprocess.Popen(args, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, start_new_session=True,
                                stdout=out, stderr=out)
        self.procs.append((name, proc))
        return proc

    def start(self) -> None:
        py = sys.executable
        if not self.env.get("AWS_ENDPOINT_URL"):
            port = int(self.env.get("MOTO_PORT", "5000"))
            if not port_free(port):
                raise RuntimeError(f"port {port} is taken: set MOTO_PORT, or AWS_ENDPOINT_URL to use that server")
            proc = self.spawn("moto", [py, "-m", "infra.local.moto_atomic", "-H", HOST, "-p", str(port)], quiet=True)
            self.env["AWS_ENDPOINT_URL"] = f"http://{HOST}:{port}"
            wait_for(f"{self.env['AWS_ENDPOINT_URL']}/moto-api/", 30, proc)
            print(f"moto server (AWS): {self.env['AWS_ENDPOINT_URL']} (log: build/local/moto.log)", flush=True)
        else:
            print(f"moto server (AWS): {self.env['AWS_ENDPOINT_URL']} (external)", flush=True)

        os.environ.update(self.env)  # the stack deploy below runs in this process
        from infra.local import stack

        self.env.update(stack.deploy(self.env["AWS_ENDPOINT_URL"], stage=self.env["CALLBRIDGE_STAGE"]))
        print(f"aws resources: stack callbridge-{self.env['CALLBRIDGE_STAGE']} from infra/template.yaml "
              f"(table {self.env['STATE_TABLE']}, bucket {self.env['RECORDINGS_BUCKET']})", flush=True)

        if not os.environ.get("SALESRENDER_API_URL"):
            port = int(self.env.get("SALESRENDER_SANDBOX_PORT", "8101"))
            proc = self.spawn("salesrender", [py, "-m", "infra.local.salesrender_sandbox", "--host", HOST,
                                              "--port", str(port), "--token", self.env["SALESRENDER_API_TOKEN"],
                                              "--company-id", self.env["SALESRENDER_COMPANY_ID"], "--quiet"])
            wait_for(f"http://{HOST}:{port}/_sandbox/health", 30, proc)
            self.env["SALESRENDER_API_URL"] = f"http://{HOST}:{port}/companies/{self.env['SALESRENDER_COMPANY_ID']}/CRM"
        else:
            print(f"salesrender: {self.env['SALESRENDER_API_URL']} (external, no sandbox)", flush=True)

        if not os.environ.get("BEELINE_API_URL"):
            port = int(self.env.get("BEELINE_SANDBOX_PORT", "8102"))
            proc = self.spawn("beeline", [py, "-m", "infra.local.beeline_sandbox", "--host", HOST, "--port", str(port),
                                          "--token", self.env["BEELINE_API_TOKEN"], "--quiet",
                                          "--time-scale", self.env.get("BEELINE_SANDBOX_TIME_SCALE", "1")])
            wait_for(f"http://{HOST}:{port}/_sandbox/health", 30, proc)
            self.env["BEELINE_API_URL"] = f"http://{HOST}:{port}/apis/portal/"
        else:
            print(f"beeline: {self.env['BEELINE_API_URL']} (external, no sandbox)", flush=True)

        app_port = int(self.env.get("CALLBRIDGE_PORT", "8000"))
        self.env.setdefault("PUBLIC_BASE_URL", f"http://{HOST}:{app_port}")
        chalice = [py, "-c", "from chalice.cli import main; main()"]
        proc = self.spawn("app", [*chalice, "local", "--host", HOST, "--port", str(app_port), "--stage", "local",
                                            "--no-autoreload"])
        wait_for(f"http://{HOST}:{app_port}/v1/health", 60, proc)
        print(f"callbridge app: http://{HOST}:{app_port} (Tilda webhook: /webhooks/tilda)", flush=True)

        self.spawn("runner", [py, "-m", "infra.local.runner"])
        print("runner: delivering SQS messages and schedules to the app's handlers", flush=True)
        print("ready", flush=True)

    def stop(self) -> None:
        # Newest first, one at a time: the runner and the app finish their calls while moto still answers.
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def watch(self, stopping) -> int:
        while not stopping():
            for name, proc in self.procs:
                if proc.poll() is not None:
                    print(f"{name} exited with {proc.returncode}: stopping", file=sys.stderr, flush=True)
                    return 1
            time.sleep(0.2)
        return 0


def main() -> int:
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: received.append(signum))
    stack = Stack()
    try:
        stack.start()
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
