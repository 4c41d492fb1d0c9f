"""What a cold Tilda request loads and which AWS clients it makes (issue 9, cold start).

A fresh interpreter (as a Lambda container would start) serves one Tilda post against moto; the check is on
what it imported, which clients and resources boto3 built and when the cyclic GC ran, not on time.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

# Runs in a child process: moto in-process, the stack deployed, then one API Gateway event for the route.
CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from moto import mock_aws

with mock_aws():
    import os
    from infra.local import stack

    os.environ.update(stack.deploy(stage="test"))
    import boto3.session
    import botocore.session

    made = {"clients": [], "resources": []}
    create_client, resource = botocore.session.Session.create_client, boto3.session.Session.resource

    def spy_client(self, service_name, *args, **kwargs):
        made["clients"].append(service_name)
        return create_client(self, service_name, *args, **kwargs)

    def spy_resource(self, service_name, *args, **kwargs):
        made["resources"].append(service_name)
        return resource(self, service_name, *args, **kwargs)

    botocore.session.Session.create_client = spy_client
    boto3.session.Session.resource = spy_resource
    before = set(sys.modules)  # moto and the deploy loaded boto3, requests and more: only what the post adds
    import gc
    os.environ["AWS_LAMBDA_FUNCTION_NAME"] = "callbridge-test-api_handler"  # as Lambda's runtime sets it
    import app

    gc_at_import = gc.isenabled()

    body = "Name=Anna&Phone=%2B79991112233&tranid=cold%3A1&formid=form493249737"
    headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Api-Key": os.environ["TILDA_API_KEY"]}
    event = {"resource": "/webhooks/tilda", "path": "/webhooks/tilda", "httpMethod": "POST", "headers": headers,
             "multiValueHeaders": {k: [v] for k, v in headers.items()}, "queryStringParameters": None,
             "multiValueQueryStringParameters": None, "pathParameters": None, "stageVariables": None,
             "body": body, "isBase64Encoded": False,
             "requestContext": {"resourcePath": "/webhooks/tilda", "httpMethod": "POST", "stage": "api",
                                "requestId": "cold", "identity": {"sourceIp": "127.0.0.1"}}}

    class Context:
        function_name, memory_limit_in_mb, aws_request_id = "callbridge-test-api_handler", 256, "cold"
        invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:callbridge-test-api_handler"

    response = app.app(event, Context())
    print(json.dumps({"status": response["statusCode"], **made, "loaded": sorted(set(sys.modules) - before),
                      "gc": [gc_at_import, gc.isenabled(), gc.get_freeze_count() > 0]}))
"""


@pytest.fixture(scope="module")
def cold_tilda_post() -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_cold_tilda_post_makes_one_dynamodb_and_one_sqs_client_and_loads_no_other_stage(cold_tilda_post):
    result = cold_tilda_post
    assert result["status"] == 200
    # The lead's transaction and the intake message: no resource layer, no SSM/S3/SNS client.
    assert sorted(result["clients"]) == ["dynamodb", "sqs"]
    assert result["resources"] == []
    loaded = result["loaded"]
    assert "functions.core.config" in loaded  # the document is validated on this path, not skipped
    for package in ("functions.calling", "functions.tracking", "functions.postcall", "functions.crm",
                    "functions.insight", "functions.providers", "aws_lambda_powertools.utilities.idempotency",
                    "aws_lambda_powertools.utilities.parameters", "aws_lambda_powertools.utilities.batch"):
        assert not [m for m in loaded if m == package or m.startswith(package + ".")], package



def test_in_lambda_the_gc_is_paused_until_the_first_invocation_ends_then_resumes(cold_tilda_post):
    at_import, after_first, frozen = cold_tilda_post["gc"]
    assert (at_import, after_first, frozen) == (False, True, True)


def test_outside_lambda_the_gc_is_left_alone():
    import gc

    from functions.core import observability

    assert gc.isenabled()
    assert observability.invocation_context(lambda event, context: "ok")({}, None) == "ok"
    assert gc.isenabled()
