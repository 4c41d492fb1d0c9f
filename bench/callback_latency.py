"""End-to-end latency on the local stack: Tilda post -> originate request seen by the Beeline sandbox.

Starts `python -m infra.local.run` (moto server, sandboxes, `chalice local`, the runner) on free ports
with CALLBACK_DELAY_SECONDS=0, posts leads one after another and reads each originate's arrival time
from the sandbox. The path measured: webhook -> intake queue -> intake worker (SalesRender addOrder)
-> callbacks queue -> dialer (order re-read, agent status, leases) -> originate.
Call events are not processed yet (the call-tracking issue), so nothing would free the operators:
CHANNEL_LEASE_SECONDS=1 lets leases and operator reservations lapse between leads instead.
`python -m bench.callback_latency [--leads 50]`; results also in build/bench/callback_latency.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def start_stack(env: dict) -> tuple[subprocess.Popen, list[str]]:
    # A throwaway state directory: the measurement must not depend on what earlier runs left in build/local.
    env = {**env, "CALLBRIDGE_LOCAL_DIR": tempfile.mkdtemp(prefix="callbridge-bench-")}
    proc = subprocess.Popen([sys.executable, "-m", "infra.local.run", "--fresh"], cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "ready":
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(120):
        os.killpg(proc.pid, signal.SIGTERM)
        raise SystemExit("the local stack did not start:\n" + "".join(lines[-30:]))
    return proc, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--leads", type=int, default=50)
    args = parser.parse_args(argv)
    ports = {"MOTO_PORT": free_port(), "SALESRENDER_SANDBOX_PORT": free_port(), "BEELINE_SANDBOX_PORT": free_port(),
             "CALLBRIDGE_PORT": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_ENDPOINT", "SALESRENDER_API_URL",
                                                                      "BEELINE_API_URL"))}
    env.update({k: str(v) for k, v in ports.items()}, CALLBACK_DELAY_SECONDS="0", CHANNEL_LEASE_SECONDS="1",
               BEELINE_SANDBOX_TIME_SCALE="0.01", POWERTOOLS_LOG_LEVEL="WARNING")
    app = f"http://127.0.0.1:{ports['CALLBRIDGE_PORT']}"
    pbx = f"http://127.0.0.1:{ports['BEELINE_SANDBOX_PORT']}"
    proc, _ = start_stack(env)
    samples = []
    try:
        for i in range(args.leads):
            digits = f"99911{i + 10:05d}"  # last two digits never 01..04: every call is answered
            body = urlencode({"Name": "Bench", "Phone": "+7" + digits, "tranid": f"bench:{time.time_ns()}",
                              "formid": "form493249737"})
            posted = time.time()
            response = requests.post(app + "/webhooks/tilda", data=body, timeout=10,
                                     headers={"Content-Type": "application/x-www-form-urlencoded",
                                              "X-Api-Key": env.get("TILDA_API_KEY", "local-tilda-key")})
            response.raise_for_status()
            deadline = time.time() + 30
            while time.time() < deadline:
                found = [c for c in requests.get(pbx + "/_sandbox/calls", timeout=5).json() if c["phone"] == digits]
                if found:
                    accepted = dt.datetime.fromisoformat(found[0]["accepted_at"].replace("Z", "+00:00"))
                    samples.append((accepted.timestamp() - posted) * 1000)
                    break
                time.sleep(0.02)
            else:
                raise SystemExit(f"lead {i}: no originate within 30 s")
            time.sleep(1.1)  # let the 1 s lease and operator reservation lapse
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    result = {"leads": len(samples), "median_ms": round(statistics.median(samples), 1),
              "p95_ms": round(percentile(samples, 95), 1), "max_ms": round(max(samples), 1)}
    out = ROOT / "build" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "callback_latency.json").write_text(json.dumps(result, indent=2))
    print(f"Tilda post -> originate (CALLBACK_DELAY_SECONDS=0), {result['leads']} leads on the local stack: "
          f"median {result['median_ms']} ms, p95 {result['p95_ms']} ms, max {result['max_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
