"""AWS cost per 1,000 leads and per month, from the request counts the burst measured (bench/burst.py).

Prices: AWS's public on-demand prices for us-east-1 (N. Virginia) as published in 2025 (DynamoDB on-demand
after its 2024-11-01 reduction), without the free tier, x86 Lambda at the 256 MB the functions are
configured with (.chalice/config.json):

- Lambda: $0.20 per million requests, $0.0000166667 per GB-second;
- SQS standard queues: $0.40 per million requests (every API call, ReceiveMessage included);
- DynamoDB on-demand: $0.625 per million write request units, $0.125 per million read request units;
- S3 Standard-IA, where the recorder stores recordings kept 30 days or more (functions/postcall/recorder.py):
  $0.01 per 1,000 PUT, $0.001 per 1,000 GET, $0.01 per GB retrieved, $0.0125 per GB-month (recordings:
  128 kbit/s MP3 of the mean talk, kept the template's 30 days; the sandbox's own MP3s are tiny); every
  PUT is priced as Standard-IA's, an upper bound for the few other objects;
- API Gateway REST APIs: $3.50 per million requests.

Counting rules: DynamoDB is priced from the capacity units the local moto server metered as DynamoDB bills
them (infra/local/moto_capacity: 1 WRU per KB of the larger of the item before and after a write, 2 per KB for
each item of a transaction, applied or cancelled, 1 more where an item enters the phone index; 1 RRU per 4 KB
read, strongly consistent), not from request counts. SQS: every request but ReceiveMessage as counted, plus
one ReceiveMessage per delivered message (Lambda's event source hands each message over once per delivery; the
local runner's empty long polls are not Lambda's). Lambda durations: the local wall time of each invocation
with its CPU part (its thread's CPU time) stretched to the functions' share of a vCPU (LAMBDA_CPU_SLOWDOWN);
the waiting part as measured, where moto and the sandboxes on a shared machine answer slower than AWS does.
Fixed monthly costs (schedules, the event sources' empty long polls) are listed apart, because they do not
grow with leads. CloudWatch Logs ($0.50 per GB ingested) and alarms are not counted here.

The real-time schedule (talk times of 1-3 minutes at full length) is a projection from the per-lead
counts of the steady run (bench/run.py: every lead called, at a clock the local stack keeps up with, so the
costs that follow a call are all in; the burst's own row divides by every accepted lead, called or not):
deliveries of the callback worker beyond one per lead and one per call release (the re-sends of waiting
callbacks on a timer: the 30 s re-send, a safety-net sweep) are multiplied by
1 / time_scale, as leads wait that many times longer in real time; a dispatch on release re-sends little,
and the factor then multiplies little. Each such re-delivery is priced with three SQS requests, the mean
DynamoDB requests of an invocation, and two provider requests (order and operator status).
"""

from __future__ import annotations

PRICES = {
    "date": "2025 (AWS public price pages; DynamoDB on-demand after the 2024-11-01 reduction)",
    "region": "us-east-1",
    "lambda_request": 0.20 / 1e6,
    "lambda_gb_second": 0.0000166667,
    "sqs_request": 0.40 / 1e6,
    "dynamodb_wru": 0.625 / 1e6,
    "dynamodb_rru": 0.125 / 1e6,
    "s3_put": 0.01 / 1000,
    "s3_get": 0.001 / 1000,
    "api_gateway_rest_request": 3.50 / 1e6,
    "s3_gb_month": 0.0125,
    "s3_gb_retrieved": 0.01,
}
# Recordings kept in S3: 128 kbit/s MP3 of the mean simulated talk (2 minutes), for the template's 30 days.
RECORDING_BYTES_PER_SECOND = 16_000
RETENTION_DAYS = 30
LAMBDA_GB = 0.25  # 256 MB
# Lambda gives a function CPU in proportion to its memory, one vCPU at 1,769 MB: at 256 MB a request's CPU
# work takes 1769 / 256 times as long as on the local run's full core (measured per thread, so other threads
# and processes do not count).
LAMBDA_CPU_SLOWDOWN = 1769 / 256
MONTH_SECONDS = 30 * 86400
DEFAULT_SCHEDULE_SECONDS = 300  # rate(5 minutes), where app.py's own rate is not known
# Lambda's SQS event source: about 5 long polls (20 s) in parallel per queue while it is idle.
IDLE_POLLS_PER_QUEUE_PER_MONTH = 5 * 3 * 60 * 24 * 30


def billed_seconds(measured: dict) -> float:
    """Lambda's duration of what the local run measured ({seconds, cpu_seconds}): the CPU part is
    LAMBDA_CPU_SLOWDOWN times longer at the functions' memory, the waiting part as measured."""
    cpu = min(measured.get("cpu_seconds", 0.0), measured["seconds"])
    return measured["seconds"] - cpu + cpu * LAMBDA_CPU_SLOWDOWN


def per_lead(burst: dict, realtime: bool = False) -> dict:
    """Requests and Lambda seconds per accepted lead; `realtime`: projected to talk times at full length."""
    leads = max(1, burst["accepted"])
    aws = burst["requests"]["aws"]
    invocations = burst["invocations"]
    workers = {k: v for k, v in invocations.items() if k.endswith("_worker")}
    schedules = {k: v for k, v in invocations.items() if not k.endswith("_worker")}
    callback = next((v for k, v in workers.items() if k.endswith("callback_worker")), {"count": 0, "seconds": 0.0})
    callback_billed = billed_seconds(callback)
    # Deliveries beyond one per lead (its first callback) and one per release (a dispatch trigger): re-sends of
    # waiting callbacks, on a timer (the 30 s re-send, the safety-net sweep), which real time multiplies.
    redeliveries = max(0, callback["count"] - burst["accepted"] - burst["called"])
    # Real time: the re-deliveries a timer made happen 1 / time_scale times as often (see the module docstring).
    added = redeliveries * (1 / burst["time_scale"] - 1) if realtime else 0.0
    api_count = sum(v["count"] for v in burst["api"].values())
    api_seconds = sum(billed_seconds(v) for v in burst["api"].values())
    delivered = sum(v["count"] for v in workers.values())
    seconds = api_seconds + sum(billed_seconds(v) for v in workers.values())
    seconds += added * callback_billed / max(1, callback["count"])
    sqs_ops = {op: n for op, n in aws.get("sqs", {}).items() if op != "ReceiveMessage"}
    # Each re-delivery is one re-send, one delivery and one delete.
    sqs_requests = sum(sqs_ops.values()) + delivered + 3 * added
    wru = sum(aws.get("dynamodb_wru", {}).values())
    rru = sum(aws.get("dynamodb_rru", {}).values())
    # A re-delivery's DynamoDB requests: the mean of an invocation's (a rough share, stated).
    per_invocation = 1 / max(1, api_count + delivered)
    wru += added * wru * per_invocation
    rru += added * rru * per_invocation
    provider = (burst["provider_requests_per_dialled_lead"] or 0) * burst["called"] + 2 * added  # order + status
    s3 = aws.get("s3", {})
    recording_gb = sum(burst["talk_seconds_simulated"]) / 2 * RECORDING_BYTES_PER_SECOND / 1e9
    return {
        "lambda_invocations": (api_count + delivered + added) / leads,
        "lambda_gb_seconds": seconds * LAMBDA_GB / leads,
        "api_gateway_requests": api_count / leads,
        "sqs_requests": sqs_requests / leads,
        "dynamodb_wru": wru / leads,
        "dynamodb_rru": rru / leads,
        "s3_put": s3.get("PUT", 0) / leads,
        "s3_get": s3.get("GET", 0) / leads,
        "s3_gb_months": burst["called"] * recording_gb * RETENTION_DAYS / 30 / leads,
        # A GET is a recording played or fetched (the CRM's CDR link): Standard-IA bills the bytes read.
        "s3_gb_retrieved": s3.get("GET", 0) * recording_gb / leads,
        "callback_deliveries_per_called_lead": (callback["count"] + added) / max(1, burst["called"]),
        "provider_requests_per_dialled_lead": provider / max(1, burst["called"]),
        "schedule_seconds_each": {k: billed_seconds(v) / max(1, v["count"]) for k, v in schedules.items()},
    }


def dollars(counts: dict) -> dict:
    p = PRICES
    parts = {
        "lambda": (counts["lambda_invocations"] * p["lambda_request"]
                   + counts["lambda_gb_seconds"] * p["lambda_gb_second"]),
        "api_gateway": counts["api_gateway_requests"] * p["api_gateway_rest_request"],
        "sqs": counts["sqs_requests"] * p["sqs_request"],
        "dynamodb": counts["dynamodb_wru"] * p["dynamodb_wru"] + counts["dynamodb_rru"] * p["dynamodb_rru"],
        "s3": (counts["s3_put"] * p["s3_put"] + counts["s3_get"] * p["s3_get"]
               + counts["s3_gb_months"] * p["s3_gb_month"] + counts["s3_gb_retrieved"] * p["s3_gb_retrieved"]),
    }
    parts["total"] = sum(parts.values())
    return parts


def schedule_periods() -> dict[str, int]:
    """Function name suffix -> seconds between runs, from app.py's @app.schedule decorators."""
    import app as app_module
    from infra.local.runner import Runner, rate_seconds

    _, schedules = Runner(app_module).sources()
    return {handler.rsplit(".", 1)[-1]: rate_seconds(expression) or DEFAULT_SCHEDULE_SECONDS
            for _, expression, handler in schedules}


def fixed_monthly(counts: dict, queues: int = 5, periods: dict[str, int] | None = None) -> dict:
    """What a deployed stage costs a month with no lead at all: the schedules and the idle event sources."""
    p = PRICES
    schedules = counts["schedule_seconds_each"]
    periods = periods or {}

    def runs(function_name: str) -> float:
        period = next((v for k, v in periods.items() if function_name.endswith(k)), DEFAULT_SCHEDULE_SECONDS)
        return MONTH_SECONDS / period

    lambda_cost = sum(runs(name) * (p["lambda_request"] + s * LAMBDA_GB * p["lambda_gb_second"])
                      for name, s in schedules.items())
    sqs = queues * IDLE_POLLS_PER_QUEUE_PER_MONTH * p["sqs_request"]
    return {"schedules": lambda_cost, "idle_sqs_polls": sqs, "total": lambda_cost + sqs}


def report(burst: dict, periods: dict[str, int] | None = None, steady: dict | None = None) -> dict:
    """The burst's row as measured; the real-time row from the steady run (every lead called) when there is
    one, else from the burst."""
    out = {"prices": PRICES, "realtime_from": "steady" if steady else "burst"}
    for name, run, realtime in (("burst", burst, False), ("realtime_projection", steady or burst, True)):
        counts = per_lead(run, realtime)
        cost = dollars(counts)
        out[name] = {"per_lead": {k: round(v, 4) for k, v in counts.items() if not isinstance(v, dict)},
                     "usd_per_1000_leads": {k: round(v * 1000, 4) for k, v in cost.items()}}
    fixed = fixed_monthly(per_lead(steady or burst), periods=periods)
    out["fixed_usd_per_month"] = {k: round(v, 2) for k, v in fixed.items()}
    per_lead_rt = dollars(per_lead(steady or burst, True))["total"]
    out["usd_per_month"] = {f"{n}_leads_a_day": round(per_lead_rt * n * 30 + fixed["total"], 2) for n in (100, 1000)}
    return out


def table(cost: dict) -> str:
    """The README's cost table (markdown), from a report()."""
    rt = cost["realtime_projection"]["usd_per_1000_leads"]
    burst = cost["burst"]["usd_per_1000_leads"]
    rows = ["| | Lambda | API Gateway | SQS | DynamoDB | S3 | total |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, c in (("per 1,000 leads, burst (measured)", burst), ("per 1,000 leads, real time (projected)", rt)):
        rows.append(f"| {label} | ${c['lambda']:.4f} | ${c['api_gateway']:.4f} | ${c['sqs']:.4f} | "
                    f"${c['dynamodb']:.4f} | ${c['s3']:.4f} | **${c['total']:.4f}** |")
    fixed = cost["fixed_usd_per_month"]
    month = cost["usd_per_month"]
    rows += ["", "| per month | AWS cost |", "|---|---:|",
             f"| fixed (schedules, idle queue polling) | ${fixed['total']:.2f} |",
             f"| 100 leads a day | ${month['100_leads_a_day']:.2f} |",
             f"| 1,000 leads a day | ${month['1000_leads_a_day']:.2f} |"]
    return "\n".join(rows)
