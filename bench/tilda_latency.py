"""Warm in-process latency of POST /webhooks/tilda, next to a bare Chalice route that returns "ok".

Both go through chalice.test.Client; AWS is moto's in-process mock (`mock_aws`), so the webhook's
figure includes moto's DynamoDB and SQS emulation, which is slower than the real services' network
round trips are fast: read it as "what our code adds", not as production latency.
`python -m bench.tilda_latency [--posts 1000]`; results also go to build/bench/tilda_latency.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
os.environ.pop("AWS_ENDPOINT_URL", None)
os.environ.update(
    AWS_DEFAULT_REGION="us-east-1", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
    CALLBRIDGE_STAGE="test", CALLBRIDGE_CONFIG=str(ROOT / "config" / "local.yaml"), TILDA_API_KEY="bench-key",
    POWERTOOLS_LOG_LEVEL="WARNING", POWERTOOLS_METRICS_DISABLED="true",
)
sys.path.insert(0, str(ROOT))


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def measure(post, n: int, warmup: int = 50) -> dict:
    for i in range(warmup):
        post(-1 - i)
    samples = []
    for i in range(n):
        start = time.perf_counter()
        post(i)
        samples.append((time.perf_counter() - start) * 1000)
    return {"n": n, "median_ms": round(statistics.median(samples), 3), "p99_ms": round(percentile(samples, 99), 3),
            "max_ms": round(max(samples), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--posts", type=int, default=1000)
    args = parser.parse_args(argv)

    from chalice import Chalice, Response
    from chalice.test import Client
    from moto import mock_aws

    bare = Chalice(app_name="bare")

    @bare.route("/ok", methods=["POST"], content_types=["application/x-www-form-urlencoded"])
    def ok():
        return Response(body="ok", status_code=200, headers={"Content-Type": "text/plain"})

    headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Api-Key": "bench-key"}
    with mock_aws():
        from infra.local import stack

        os.environ.update(stack.deploy(stage="test"))
        import app

        with Client(app.app, stage_name="test", project_dir=str(ROOT)) as client, Client(bare) as bare_client:

            def webhook(i):
                body = urlencode({"Name": "Анна", "Phone": "+7 (999) 111-22-33", "tranid": f"bench:{i}",
                                  "formid": "form493249737", "utm_source": "vk"})
                response = client.http.post("/webhooks/tilda", body=body, headers=headers)
                assert response.status_code == 200, response.body

            def bare_route(i):
                assert bare_client.http.post("/ok", body="a=1", headers=headers).status_code == 200

            with contextlib.redirect_stdout(io.StringIO()):  # the EMF lines; the work to print them is counted
                results = {"bare_chalice_route": measure(bare_route, args.posts),
                           "tilda_webhook": measure(webhook, args.posts)}
    out = ROOT / "build" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "tilda_latency.json").write_text(json.dumps(results, indent=2))
    print(f"{'route':<22}{'n':>6}{'median ms':>12}{'p99 ms':>10}{'max ms':>10}")
    for name, r in results.items():
        print(f"{name:<22}{r['n']:>6}{r['median_ms']:>12.3f}{r['p99_ms']:>10.3f}{r['max_ms']:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
