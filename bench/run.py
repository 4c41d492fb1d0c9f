"""`make bench [LEADS=1000]`: every benchmark of issue 9 in one run, side by side, as a table and as JSON.

Runs, each in its own process (they set up their environments differently):
1. bench.cold_start: the Lambda package (built by `infra.deploy package`, byte-compiled), its size, and
   cold starts of the Tilda route and the callback worker against a minimal Chalice app with one put_item;
2. bench.tilda_latency: the warm webhook in-process against a bare Chalice route;
3. bench.burst: LEADS leads in 60 s through the local stack at the sandbox's fast clock (accepted, ordered,
   called, duplicates, lost, peak channels; throughput and idle gaps over the whole run and over the steady
   backlog once the intake is done; requests);
4. bench.burst again as the *steady* run: 60 leads in 60 s at a clock the local stack keeps up with, so
   every lead is called: throughput against capacity and idle gaps while measured by the dispatch, not by the
   machine, and the requests of leads that were all called, which the cost's real-time row is priced from;
5. bench.cost: AWS cost per 1,000 leads (the burst as measured; real time from the steady run) and per month.

Every ratio is against a baseline measured in the same run (or a target of issue 9 where the baseline is
a number: the channel limit, the operators' capacity, wrap-up + 2 s). The JSON, build/bench/bench.json
(and one file per part), carries the commit, so runs of two commits can be compared. The default run
stays under 15 minutes: the burst stops waiting after --burst-seconds and reports what is not done yet.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "bench"
# The burst's sandbox clock: 5 times faster than real calls (talk 12-36 s), so 12 operators serve about 0.46
# calls/s. At 50 times (0.02) their capacity, 3.5 calls/s, needed about 190 DynamoDB requests/s for the calls
# alone on top of the intake's, more than one moto process on two cores answers: the bench then measured the
# machine. At 0.2 the intake of 1,000 leads is done in about four minutes and the rest of the run is a real
# backlog (some 850 leads waiting) served at the operators' pace: what issue 9's throughput and idle gap mean.
BURST_TIME_SCALE = 0.2
# The steady run's sandbox clock: 5 times faster than real calls (talk 12-36 s), which the local stack on two
# cores keeps up with, so its throughput and idle gaps are the dispatch's and not the machine's.
STEADY_TIME_SCALE = 0.2
# Its leads arrive at one a second: twice the operators' capacity at that clock (a backlog builds), yet a load
# under which moto answers about as fast as DynamoDB does, so the Lambda durations priced are not the
# saturated stack's.
STEADY_POST_SECONDS = 60


def _run(module: str, *args: str, timeout: float = 900) -> None:
    started = time.monotonic()
    print(f"bench: {module} {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, timeout=timeout, text=True,
                          capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"bench: {module} done in {time.monotonic() - started:.0f} s", flush=True)


def _ratio(value, baseline) -> str:
    if value is None or not baseline:
        return "-"
    return f"{value / baseline:.2f}"


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,}"


def rows(result: dict) -> list[tuple[str, object, str, object, str]]:
    """(figure, value, baseline name, baseline value, target) for the table."""
    b, c, w, cost = result["burst"], result["cold_start"], result["tilda_latency"], result["cost"]
    st = result.get("steady") or b
    cs, pkg = c["cold_start"], c["package"]
    aws = st["requests"]["aws"]
    dynamo = sum(aws.get("dynamodb", {}).values())
    sqs = sum(n for op, n in aws.get("sqs", {}).items() if op != "ReceiveMessage")
    leads = max(1, st["accepted"])
    wrap_gap = b["wrap_up_seconds"] + 2
    bs = b.get("steady") or {}
    out = [
        ("burst: accepted", b["accepted"], "leads posted", b["leads"], "all"),
        ("burst: ordered (CRM orders)", b["ordered"], "accepted", b["accepted"], "all"),
        ("burst: called", b["called"], "accepted", b["accepted"], "all"),
        ("burst: duplicates", b["duplicates"], "called", b["called"], "0"),
        ("burst: lost", b["lost"], "accepted", b["accepted"], "0"),
        ("burst: still on its way at the end", b["not_called"] - b["lost"], "accepted", b["accepted"], "0"),
        ("burst: peak concurrent calls", b["peak_concurrent_calls"], "channel limit", b["channel_limit"], "<= 1"),
        ("burst: throughput, calls/s", b["throughput_calls_per_s"], "operators' capacity",
         b["capacity_calls_per_s"], ">= 0.90"),
        ("burst: operator idle gap median, s", b["idle_gap_median_s"], "wrap-up + 2 s", wrap_gap, "<= 1"),
        ("burst: operator idle gap p95, s", b["idle_gap_p95_s"], "wrap-up + 2 s", wrap_gap, "<= 1"),
        ("burst: intake done after, s", b.get("intake_done_after_s"), "", None, ""),
        ("burst, steady backlog: throughput, calls/s", bs.get("throughput_calls_per_s"), "operators' capacity",
         b["capacity_calls_per_s"], ">= 0.90"),
        ("burst, steady backlog: idle gap p95, s", bs.get("idle_gap_p95_s"), "wrap-up + 2 s", wrap_gap, "<= 1"),
        (f"steady run ({st['leads']} leads, clock x{1 / st['time_scale']:g}): called", st["called"], "accepted",
         st["accepted"], "all"),
        ("steady run: duplicates / lost", st["duplicates"] + st["lost"], "called", st["called"], "0"),
        ("steady run: peak concurrent calls", st["peak_concurrent_calls"], "channel limit", st["channel_limit"],
         "<= 1"),
        ("steady run: throughput, calls/s", st["throughput_calls_per_s"], "operators' capacity",
         st["capacity_calls_per_s"], ">= 0.90"),
        ("steady run: operator idle gap median, s", st["idle_gap_median_s"], "wrap-up + 2 s", wrap_gap, "<= 1"),
        ("steady run: operator idle gap p95, s", st["idle_gap_p95_s"], "wrap-up + 2 s", wrap_gap, "<= 1"),
        # Issue 9's bound is per dial: the CRM re-read, the agent status and the originate.
        ("provider requests per dial", st.get("dial_requests_per_dialled_lead"), "target", 3, "<= 1"),
        ("all provider requests per dialled lead", st["provider_requests_per_dialled_lead"], "", None, ""),
        ("DynamoDB requests per lead (steady run)", dynamo / leads, "", None, ""),
        ("DynamoDB write units per lead (steady run)", sum(aws.get("dynamodb_wru", {}).values()) / leads, "", None, ""),
        ("DynamoDB read units per lead (steady run)", sum(aws.get("dynamodb_rru", {}).values()) / leads, "", None, ""),
        ("SQS requests per lead (steady run, no empty polls)", sqs / leads, "", None, ""),
        ("AWS $ per 1,000 leads, burst", cost["burst"]["usd_per_1000_leads"]["total"], "target $", 0.10, "<= 1"),
        ("AWS $ per 1,000 leads, real time (projected)",
         cost["realtime_projection"]["usd_per_1000_leads"]["total"], "target $", 0.10, "<= 1"),
        ("cold start: Tilda post, CPU ms", cs["tilda"]["cpu_ms"], "minimal app, CPU ms",
         cs["minimal_route"]["cpu_ms"], "<= 1.5"),
        ("cold start: Tilda post, wall ms", cs["tilda"]["wall_ms"], "minimal app, wall ms",
         cs["minimal_route"]["wall_ms"], ""),
        ("cold start: Tilda post without .pyc, CPU ms", cs["tilda_no_pyc"]["cpu_ms"], "minimal app, CPU ms",
         cs["minimal_route"]["cpu_ms"], ""),
        ("cold start: first callback message, CPU ms", cs["callback"]["cpu_ms"], "minimal SQS handler, CPU ms",
         cs["minimal_sqs"]["cpu_ms"], ""),
        ("cold start: callback without .pyc, CPU ms", cs["callback_no_pyc"]["cpu_ms"],
         "minimal SQS handler, CPU ms", cs["minimal_sqs"]["cpu_ms"], ""),
        ("package zipped, MB", pkg["zipped_bytes"] / 1e6, "target, MB", 4.0, "<= 1"),
        ("package unzipped, MB", pkg["unzipped_bytes"] / 1e6, "", None, ""),
        ("warm Tilda webhook median, ms", w["tilda_webhook"]["median_ms"], "bare Chalice route, ms",
         w["bare_chalice_route"]["median_ms"], ""),
    ]
    return out


def print_table(result: dict) -> None:
    table = rows(result)
    print(f"\n{'figure':<48}{'value':>12}  {'baseline':<28}{'':>10}{'ratio':>8}  target")
    for name, value, base_name, base, target in table:
        ratio = _ratio(value, base) if base_name else ""
        shown = _fmt(base) if base_name else ""
        print(f"{name:<48}{_fmt(value):>12}  {base_name:<28}{shown:>10}{ratio:>8}  {target}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leads", type=int, default=1000)
    parser.add_argument("--post-seconds", type=float, default=60)
    parser.add_argument("--burst-seconds", type=float, default=450, help="longest wait for the burst's calls")
    parser.add_argument("--time-scale", type=float, default=BURST_TIME_SCALE, help="the burst's sandbox clock")
    parser.add_argument("--steady-leads", type=int, default=60, help="leads of the steady run (0: none)")
    parser.add_argument("--steady-time-scale", type=float, default=STEADY_TIME_SCALE)
    parser.add_argument("--trials", type=int, default=2, help="cold starts of each kind")
    parser.add_argument("--posts", type=int, default=200, help="warm webhook posts")
    parser.add_argument("--skip-burst", action="store_true", help="reuse build/bench/burst.json and steady.json")
    parser.add_argument("--skip-cold-start", action="store_true", help="reuse build/bench/cold_start.json")
    args = parser.parse_args(argv)
    started = time.monotonic()
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.skip_cold_start:
        _run("bench.cold_start", "--trials", str(args.trials))
    _run("bench.tilda_latency", "--posts", str(args.posts))
    if not args.skip_burst:
        _run("bench.burst", "--leads", str(args.leads), "--post-seconds", str(args.post_seconds),
             "--max-seconds", str(args.burst_seconds), "--time-scale", str(args.time_scale))
        if args.steady_leads:
            _run("bench.burst", "--leads", str(args.steady_leads), "--post-seconds", str(STEADY_POST_SECONDS),
                 "--max-seconds", str(args.burst_seconds), "--time-scale", str(args.steady_time_scale),
                 "--out", "steady.json")
    from bench import cost

    burst = json.loads((OUT / "burst.json").read_text())
    steady = json.loads((OUT / "steady.json").read_text()) if args.steady_leads else None
    report = cost.report(burst, cost.schedule_periods(), steady)
    (OUT / "cost.json").write_text(json.dumps(report, indent=2))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip())
    result = {"commit": commit, "dirty": dirty, "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "seconds": round(time.monotonic() - started),
              "cold_start": json.loads((OUT / "cold_start.json").read_text()),
              "tilda_latency": json.loads((OUT / "tilda_latency.json").read_text()),
              "burst": burst, "steady": steady, "cost": report}
    (OUT / "bench.json").write_text(json.dumps(result, indent=2))
    print_table(result)
    print("\nAWS cost (prices: us-east-1, " + cost.PRICES["date"] + "):\n")
    print(cost.table(report))
    print(f"\nbench: {result['seconds']} s; JSON in {OUT.relative_to(ROOT)}/bench.json (commit {commit[:10]}"
          f"{', uncommitted changes' if dirty else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
