"""A burst of leads through the whole local stack (`make run`), measured from the outside.

`LEADS` leads (default 1,000) are posted to the Tilda webhook evenly over `--post-seconds` (default 60)
with CALLBACK_DELAY_SECONDS=0, into a configuration made for the run from config/local.yaml: one offer,
OPERATORS operators (extra abonents of the Beeline sandbox), a channel limit of as many, and, where the
configuration has it (issue 9's dispatch on release), `wrap_up_seconds`. The Beeline sandbox's clock runs
TIME_SCALE times faster and draws talk times of 60-180 simulated seconds per call, so a minute of talk
takes a fraction of a second; every number ends in neither 01..04, so every call is answered.

Measured from the sandboxes and the moto server, never from the code under test:
- accepted (200 answers), ordered (SalesRender sandbox orders), called (Beeline originates, distinct
  numbers), duplicates (originates beyond one per number), lost (accepted, never called, and no longer in
  any queue when the stack went quiet or the time ran out: `pending` counts the ones still queued);
- peak concurrent calls (the sandbox's in-flight maximum) against the channel limit; throughput in calls/s
  while a backlog waited, against the operators' capacity, operators / (mean call + wrap-up);
- the operator idle gap: per operator, from a call's release to the same operator's next originate, for
  gaps during which a lead was waiting; median and p95;
- requests: SalesRender and Beeline API requests per dialled lead (sandbox logs), DynamoDB, SQS and S3
  requests per lead (moto's request counter), Lambda invocations and their durations (the runner's and the
  app's access log), so that bench/cost.py can price them.

Whatever runs the dispatch when this runs is measured: before issue 9's dispatch on release (callbacks
re-sent every 30 s) and after it alike.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import itertools
import json
import os
import re
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
import yaml

ROOT = Path(__file__).resolve().parent.parent
TALK_SECONDS = (60.0, 180.0)  # simulated talk of 1-3 minutes
RING_SECONDS = 10.0  # the sandbox rings the operator, then the customer, 5 s each
# Lead states of a lead that was accepted but will never be called (every bench number is dialable, the budget
# is unlimited and the hours are open): anything else not yet called is still on its way.
LOST_STATES = ("missing", "failed", "done", "closed", "exhausted", "not_dialable", "do_not_call")
_ACCESS = re.compile(r'"(GET|POST|PUT|DELETE) (\S+) HTTP/[0-9.]+" (\d{3}) \S+ ([0-9.]+)ms(?: cpu ([0-9.]+)ms)?')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(samples: list[float], p: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _pace(originates: list[float], gaps: list[float]) -> dict:
    """Throughput over a run of originates (sorted), and the operator idle gaps' median and p95."""
    span = originates[-1] - originates[0] if len(originates) > 1 else 0
    return {"throughput_calls_per_s": round((len(originates) - 1) / span, 3) if span else None,
            "idle_gap_median_s": round(statistics.median(gaps), 3) if gaps else None,
            "idle_gap_p95_s": round(percentile(gaps, 95), 3) if gaps else None, "idle_gaps": len(gaps)}


def _ts(iso: str | None) -> float | None:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() if iso else None


def bench_config(path: Path, operators: int, wrap_up_seconds: int) -> dict:
    """The run's configuration document: config/local.yaml with one offer and the bench's operators."""
    from functions.core import config

    doc = yaml.safe_load((ROOT / "config" / "local.yaml").read_text(encoding="utf-8"))
    offer = next(o for o in doc["offers"] if o["id"] == 101)
    offer["operators"] = [str(300 + i) for i in range(operators)]
    offer["distribution"] = "round_robin"
    has_wrap_up = "wrap_up_seconds" in config.Offer.model_fields
    if has_wrap_up:
        offer["wrap_up_seconds"] = wrap_up_seconds
    doc["offers"] = [offer]
    doc["default_offer_id"] = 101
    doc["provider"]["channel_limit"] = operators
    doc["budget"]["monthly_rub"] = 100_000_000  # the bench measures throughput, not the budget stop
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    config.parse(path.read_text(encoding="utf-8"), str(path))  # what make run checks too
    return {"operators": operators, "channel_limit": operators, "wrap_up_seconds": wrap_up_seconds if has_wrap_up
            else 0, "wrap_up_configurable": has_wrap_up}


class Stack:
    """`python -m infra.local.run --fresh` on free ports in a throwaway state directory; its output kept."""

    def __init__(self, env: dict):
        self.env = env
        self.lines: list[str] = []
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "infra.local.run", "--fresh"], cwd=ROOT, env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                if line.strip() == "ready":
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout):
            self.stop()
            raise SystemExit("the local stack did not start:\n" + "\n".join(self.lines[-30:]))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        time.sleep(0.5)  # the reader thread takes the last lines


def _moto_counts(aws: str) -> dict:
    return requests.get(aws + "/_callbridge/requests", timeout=10).json()


def _diff(after: dict, before: dict) -> dict:
    return {svc: {op: n - before.get(svc, {}).get(op, 0) for op, n in ops.items()
                  if n - before.get(svc, {}).get(op, 0)} for svc, ops in after.items()}


def _queue_depths(aws: str) -> dict[str, int]:
    import boto3

    sqs = boto3.client("sqs", endpoint_url=aws, region_name="us-east-1", aws_access_key_id="local",
                       aws_secret_access_key="local")
    depths = {}
    for url in sqs.list_queues().get("QueueUrls", []):
        attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed"])["Attributes"]
        depths[url.rsplit("/", 1)[-1]] = sum(int(v) for v in attrs.values())
    return depths


def _lead_states(aws: str, phones10: list[str]) -> dict[str, int]:
    """The states of the leads of these numbers, read through records/ (which knows the keys): "missing" for
    a number without a lead."""
    os.environ.update(AWS_ENDPOINT_URL=aws, AWS_ACCESS_KEY_ID="local", AWS_SECRET_ACCESS_KEY="local",
                      AWS_DEFAULT_REGION="us-east-1", CALLBRIDGE_STAGE="local")
    from functions.core import resources
    from functions.records import leads

    resources.reset()
    states: dict[str, int] = {}
    deadline = time.monotonic() + 60
    for phone in phones10:
        if time.monotonic() > deadline:  # a slow stack: the rest stays unread rather than the bench overrunning
            state = "unread"
        else:
            lead = leads.latest_by_phone("+7" + phone)
            state = lead.get("state", "?") if lead else "missing"
        states[state] = states.get(state, 0) + 1
    return states


def run(leads: int = 1000, post_seconds: float = 60.0, operators: int = 12, time_scale: float = 0.2,
        wrap_up_seconds: int = 1, max_seconds: float = 420.0, quiet_seconds: float = 30.0) -> dict:
    ports = {"MOTO_PORT": free_port(), "SALESRENDER_SANDBOX_PORT": free_port(), "BEELINE_SANDBOX_PORT": free_port(),
             "CALLBRIDGE_PORT": free_port()}
    scratch = Path(tempfile.mkdtemp(prefix="callbridge-bench-"))
    setup = bench_config(scratch / "bench.yaml", operators, wrap_up_seconds)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_ENDPOINT", "SALESRENDER_API_URL", "BEELINE_API_URL", "CALLBRIDGE_STAGE"))}
    env.update({k: str(v) for k, v in ports.items()}, CALLBACK_DELAY_SECONDS="0", CALLBRIDGE_LOCAL_DIR=str(scratch),
               CALLBRIDGE_CONFIG=str(scratch / "bench.yaml"), BEELINE_SANDBOX_TIME_SCALE=str(time_scale),
               BEELINE_SANDBOX_TALK_SECONDS=f"{TALK_SECONDS[0]:g}-{TALK_SECONDS[1]:g}",
               BEELINE_SANDBOX_EXTRA_ABONENTS=str(operators), POWERTOOLS_LOG_LEVEL="WARNING",
               POWERTOOLS_METRICS_DISABLED="true")
    app = f"http://127.0.0.1:{ports['CALLBRIDGE_PORT']}"
    pbx = f"http://127.0.0.1:{ports['BEELINE_SANDBOX_PORT']}"
    crm = f"http://127.0.0.1:{ports['SALESRENDER_SANDBOX_PORT']}"
    aws = f"http://127.0.0.1:{ports['MOTO_PORT']}"
    stack = Stack(env)
    stack.start()
    result: dict = {"leads": leads, "post_seconds": post_seconds, "time_scale": time_scale, **setup,
                    "talk_seconds_simulated": list(TALK_SECONDS)}
    try:
        time.sleep(2)  # the runner's first schedule pass (subscription) settles before the counters start
        moto_before = _moto_counts(aws)
        crm_before = len(requests.get(crm + "/_sandbox/requests", timeout=30).json())
        pbx_before = requests.get(pbx + "/_sandbox/stats", timeout=10).json()["api_requests"]
        log_start = len(stack.lines)
        posted: dict[str, float] = {}
        statuses: list[int] = []
        key = env.get("TILDA_API_KEY", "local-tilda-key")
        session = requests.Session()
        session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=64))

        def post(i: int) -> None:
            digits = f"999{i:06d}5"  # ends in x5: never 01..04, every call answered
            body = urlencode({"Name": "Bench", "Phone": "+7" + digits, "tranid": f"bench:{i}:{time.time_ns()}",
                              "formid": "form493249737"})
            posted[digits] = time.time()
            try:
                response = session.post(app + "/webhooks/tilda", data=body, timeout=30,
                                        headers={"Content-Type": "application/x-www-form-urlencoded",
                                                 "X-Api-Key": key})
                statuses.append(response.status_code)
            except requests.RequestException:
                statuses.append(0)

        started = time.time()
        pool = concurrent.futures.ThreadPoolExecutor(32)
        futures = []
        for i in range(leads):
            delay = started + i * post_seconds / leads - time.time()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(post, i))
        # A stack slower than the posts (a busy machine) must not stretch the bench past its time.
        concurrent.futures.wait(futures, timeout=max(1.0, started + max_seconds - time.time()))
        pool.shutdown(wait=False, cancel_futures=True)
        posting_done = time.time()
        accepted = sum(1 for s in statuses if s == 200)
        unanswered = leads - len(statuses)

        # Wait until every accepted lead was called and every call ended, or nothing moved (no originate, no
        # release) for longer than the longest call could last, or the time is up: with every channel on a
        # call, nothing moves until the first of them ends.
        quiet = max(quiet_seconds, 1.5 * (TALK_SECONDS[1] + RING_SECONDS) * time_scale)
        last_progress, last_seen, calls = time.time(), None, []
        while time.time() - started < max_seconds:
            calls = [c for c in requests.get(pbx + "/_sandbox/calls", timeout=60).json()
                     if c["direction"] == "OUTBOUND"]
            released = sum(1 for c in calls if c.get("released_at"))
            if len({c["phone"] for c in calls}) >= accepted and released == len(calls):
                break
            if (len(calls), released) != last_seen:
                last_seen, last_progress = (len(calls), released), time.time()
            elif time.time() - last_progress > quiet:
                break
            time.sleep(2)
        finished = time.time()
        time.sleep(3)  # the last events, recordings and postbacks land
        calls = [c for c in requests.get(pbx + "/_sandbox/calls", timeout=60).json() if c["direction"] == "OUTBOUND"]
        pbx_stats = requests.get(pbx + "/_sandbox/stats", timeout=10).json()
        orders = requests.get(crm + "/_sandbox/orders", timeout=60).json()
        crm_requests = requests.get(crm + "/_sandbox/requests", timeout=60).json()[crm_before:]
        moto = _diff(_moto_counts(aws), moto_before)
        depths = _queue_depths(aws)
        called_phones = {c["phone"] for c in calls}
        states = _lead_states(aws, [p for p in posted if p not in called_phones])
    finally:
        stack.stop()

    by_phone: dict[str, list[dict]] = {}
    for c in calls:
        by_phone.setdefault(c["phone"], []).append(c)
    bench_phones = {p for p in posted}
    called = len(bench_phones & set(by_phone))
    duplicates = sum(len(v) - 1 for p, v in by_phone.items() if p in bench_phones)
    pending = sum(n for q, n in depths.items() if not q.endswith("-dlq"))
    dead = sum(n for q, n in depths.items() if q.endswith("-dlq"))
    durations = [_ts(c["released_at"]) - c["accepted_ts"] for c in calls if c.get("released_at")]
    mean_call = statistics.fmean(durations) if durations else None
    wrap = setup["wrap_up_seconds"]
    capacity = operators / (mean_call + wrap) if mean_call else None
    originates = sorted(c["accepted_ts"] for c in calls)
    # The steady backlog: from the moment the last accepted lead had its CRM order (the intake is done, so the
    # workers that dial no longer share the machine with the burst's intake) to the last originate.
    created = [_ts(o["createdAt"]) for o in orders if o.get("createdAt")]
    intake_done = max(created) if len(created) >= accepted and created else None
    steady = [t for t in originates if intake_done is not None and t >= intake_done]

    # Idle gaps: per operator, release -> next originate, while some lead was waiting (posted before that release
    # and originated after it).
    waiting_posts = sorted(posted[c["phone"]] for c in calls if c["phone"] in posted)
    starts = {c["phone"]: c["accepted_ts"] for c in calls}
    gaps, steady_gaps = [], []
    by_operator: dict[str, list[dict]] = {}
    for c in calls:
        by_operator.setdefault(c.get("extension") or c["pattern"], []).append(c)
    for ops in by_operator.values():
        ops.sort(key=lambda c: c["accepted_ts"])
        for prev, nxt in itertools.pairwise(ops):
            freed = _ts(prev.get("released_at"))
            if freed is None:
                continue
            backlog = any(t < freed and starts.get(p, 0) > freed for p, t in posted.items())
            if backlog:
                gaps.append(nxt["accepted_ts"] - freed)
                if intake_done is not None and freed >= intake_done:
                    steady_gaps.append(nxt["accepted_ts"] - freed)
    del waiting_posts

    api = [m for m in (_ACCESS.search(line) for line in stack.lines[log_start:]) if m]
    api_by_route: dict[str, list[float]] = {}
    api_cpu: dict[str, float] = {}
    for m in api:
        route = re.sub(r"^/webhooks/beeline/.*", "/webhooks/beeline/{secret}", m.group(2).split("?")[0])
        api_by_route.setdefault(f"{m.group(1)} {route}", []).append(float(m.group(4)))
        api_cpu[f"{m.group(1)} {route}"] = api_cpu.get(f"{m.group(1)} {route}", 0.0) + float(m.group(5) or 0)
    runner = {}
    for line in stack.lines:
        if line.startswith('{"runner": "stopped"'):
            runner = json.loads(line)["invocations"]
    pbx_requests = {op: n - pbx_before.get(op, 0) for op, n in pbx_stats["api_requests"].items()
                    if n - pbx_before.get(op, 0)}
    crm_ops: dict[str, int] = {}
    for entry in crm_requests:
        for op in entry.get("operation") or ["?"]:
            crm_ops[op] = crm_ops.get(op, 0) + 1

    result.update({
        "posting_seconds": round(posting_done - started, 1), "dialling_seconds": round(finished - started, 1),
        "accepted": accepted, "rejected_or_failed": len(statuses) - accepted,
        "not_answered_in_time": unanswered,
        "ordered": len(orders), "called": called, "duplicates": duplicates,
        "not_called": accepted - called, "not_called_lead_states": states, "messages_in_queues": pending,
        "in_dlqs": dead,
        # Never called and no longer on its way: no lead, or a lead finished without a call.
        "lost": sum(n for state, n in states.items() if state in LOST_STATES),
        "peak_concurrent_calls": pbx_stats["max_in_flight"],
        "mean_call_seconds": round(mean_call, 3) if mean_call else None,
        "capacity_calls_per_s": round(capacity, 3) if capacity else None,
        **_pace(originates, gaps),
        "intake_done_after_s": round(intake_done - started, 1) if intake_done else None,
        "steady": {"calls": len(steady), "seconds": round(steady[-1] - steady[0], 1) if len(steady) > 1 else 0,
                   **_pace(steady, steady_gaps)},
        "requests": {"salesrender": crm_ops, "beeline": pbx_requests, "aws": moto},
        "api": {route: {"count": len(v), "seconds": round(sum(v) / 1000, 3),
                        "cpu_seconds": round(api_cpu.get(route, 0.0) / 1000, 3)} for route, v in api_by_route.items()},
        "invocations": runner,
    })
    provider = sum(crm_ops.values()) + sum(pbx_requests.values())
    result["provider_requests_per_dialled_lead"] = round(provider / called, 2) if called else None
    # The dial's own requests: the order re-read (every ordersFetcher but the order webhook's, one per
    # webhook post; a failed one re-read later counts here too, so this errs high), agent status, originate.
    webhook_reads = len(api_by_route.get("POST /webhooks/salesrender/***", []))
    dial = (max(0, crm_ops.get("ordersFetcher", 0) - webhook_reads) + pbx_requests.get("agent", 0)
            + pbx_requests.get("call", 0))
    result["dial_requests_per_dialled_lead"] = round(dial / called, 2) if called else None
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--leads", type=int, default=1000)
    parser.add_argument("--post-seconds", type=float, default=60)
    parser.add_argument("--operators", type=int, default=12)
    parser.add_argument("--time-scale", type=float, default=0.2)  # bench/run.py says why
    parser.add_argument("--max-seconds", type=float, default=450)
    parser.add_argument("--out", default="burst.json", help="file name in build/bench/")
    args = parser.parse_args(argv)
    result = run(args.leads, args.post_seconds, args.operators, args.time_scale, max_seconds=args.max_seconds)
    out = ROOT / "build" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("requests", "api", "invocations")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
