"""infra/template.yaml, and the local stack built from it (infra/local/stack.py).

Self-contained: sets its own fake AWS environment and runs moto in-process, so it depends on neither
conftest.py nor a running moto server.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import boto3
import pytest
import yaml
from moto import mock_aws

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

stack = importlib.import_module("infra.local.stack")  # after the path fix, without relying on conftest

TEMPLATE = ROOT / "infra" / "template.yaml"
KINDS = importlib.import_module("functions.core.resources").QUEUES
MAX_RECEIVE = dict.fromkeys(KINDS, 25)
ENV_KEYS = {
    "CALLBRIDGE_STAGE",
    *(f"{kind.upper()}_{suffix}" for kind in KINDS for suffix in ("QUEUE", "DLQ")),
    "STATE_TABLE",
    "RECORDINGS_BUCKET",
    "ALERTS_TOPIC_ARN",
}

# moto warns about the resource types its CloudFormation skips (alarms, bucket policy); expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Tried to parse AWS:UserWarning")  # no "::" (the field separator)


@pytest.fixture
def aws(monkeypatch):
    """A fresh in-process AWS, with fake credentials and no leftover resource-name overrides."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SECURITY_TOKEN": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    for key in ENV_KEYS | {"AWS_ENDPOINT_URL", "AWS_PROFILE"}:
        monkeypatch.delenv(key, raising=False)
    with mock_aws():
        yield


def queue_attributes(name: str) -> dict:
    sqs = boto3.client("sqs")
    url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]


def lifecycle(bucket: str) -> list[dict]:
    return boto3.client("s3").get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]


# --- the template ---------------------------------------------------------------------------------------


def test_template_passes_cfn_lint():
    from cfnlint.api import lint_file

    matches = lint_file(TEMPLATE)
    assert [str(m) for m in matches] == []  # errors, warnings and informational findings alike


def test_template_is_plain_yaml_with_the_agreed_outputs():
    text = TEMPLATE.read_text(encoding="utf-8")
    assert "!Ref" not in text and "!Sub" not in text and "!GetAtt" not in text
    template = yaml.safe_load(text)
    assert set(template["Outputs"]) == set(stack.OUTPUT_ENV)
    for name, output in template["Outputs"].items():
        assert output["Export"]["Name"] == {"Fn::Sub": f"callbridge-${{Stage}}-{name}"}
    params = template["Parameters"]
    assert params["Stage"]["Default"] == "dev"
    assert params["RetentionDays"] == {**params["RetentionDays"], "Type": "Number", "Default": 30, "MinValue": 1}
    subscription = template["Resources"]["AlertsEmailSubscription"]
    assert subscription["Condition"] == "HasAlertEmail"


def test_template_alarms_on_every_dlq():
    resources = stack.load_template()["Resources"]
    alarms = {name: r["Properties"] for name, r in resources.items()
              if r["Type"] == "AWS::CloudWatch::Alarm" and r["Properties"].get("Namespace") == "AWS/SQS"}
    watched = sorted(a["Dimensions"][0]["Value"]["Fn::GetAtt"][0] for a in alarms.values())
    assert watched == sorted(f"{kind.capitalize()}Dlq" for kind in KINDS)
    for alarm in alarms.values():
        assert alarm["MetricName"] == "ApproximateNumberOfMessagesVisible"
        assert (alarm["Period"], alarm["EvaluationPeriods"], alarm["Threshold"]) == (300, 1, 0)
        assert alarm["ComparisonOperator"] == "GreaterThanThreshold"
        assert alarm["AlarmActions"] == [{"Ref": "AlertsTopic"}]


def test_template_lifecycle_rules_in_s3_api_shape():
    assert stack.template_lifecycle_rules(30) == [
        {
            "ID": "expire-after-retention",
            "Status": "Enabled",
            "Filter": {"Prefix": ""},
            "Expiration": {"Days": 30},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
        }
    ]
    assert stack.template_lifecycle_rules(7)[0]["Expiration"] == {"Days": 7}


# --- deploy() on moto ----------------------------------------------------------------------------------


def test_deploy_creates_queues_with_redrive(aws):
    env = stack.deploy(stage="local")
    assert len(boto3.client("sqs").list_queues()["QueueUrls"]) == 2 * len(KINDS)
    for kind in KINDS:
        queue = queue_attributes(env[f"{kind.upper()}_QUEUE"])
        dlq = queue_attributes(env[f"{kind.upper()}_DLQ"])
        assert env[f"{kind.upper()}_QUEUE"] == f"callbridge-local-{kind}"
        assert env[f"{kind.upper()}_DLQ"] == f"callbridge-local-{kind}-dlq"
        assert json.loads(queue["RedrivePolicy"]) == {
            "deadLetterTargetArn": dlq["QueueArn"],
            "maxReceiveCount": MAX_RECEIVE[kind],
        }
        assert queue["VisibilityTimeout"] == "360"
        assert queue["MessageRetentionPeriod"] == "345600"
        assert dlq["MessageRetentionPeriod"] == "1209600"
        assert queue["SqsManagedSseEnabled"] == dlq["SqsManagedSseEnabled"] == "true"
        assert "RedrivePolicy" not in dlq


def test_deploy_creates_the_state_table(aws):
    env = stack.deploy(stage="local")
    ddb = boto3.client("dynamodb")
    table = ddb.describe_table(TableName=env["STATE_TABLE"])["Table"]
    assert table["TableName"] == "callbridge-local-state"
    assert table["KeySchema"] == [
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ]
    assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert ddb.describe_time_to_live(TableName=env["STATE_TABLE"])["TimeToLiveDescription"] == {
        "TimeToLiveStatus": "ENABLED",
        "AttributeName": "ttl",
    }
    backups = ddb.describe_continuous_backups(TableName=env["STATE_TABLE"])["ContinuousBackupsDescription"]
    assert backups["PointInTimeRecoveryDescription"]["PointInTimeRecoveryStatus"] == "ENABLED"


def test_deploy_creates_the_private_encrypted_expiring_bucket(aws):
    env = stack.deploy(stage="local")
    s3 = boto3.client("s3")
    bucket = env["RECORDINGS_BUCKET"]
    assert bucket == "callbridge-local-recordings-123456789012"  # moto's default account id
    assert s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "IgnorePublicAcls": True,
        "BlockPublicPolicy": True,
        "RestrictPublicBuckets": True,
    }
    assert s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"] == [
        {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}, "BucketKeyEnabled": True}
    ]
    assert s3.get_bucket_ownership_controls(Bucket=bucket)["OwnershipControls"] == {
        "Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]
    }
    assert lifecycle(bucket) == stack.template_lifecycle_rules(30)
    # The TLS-only policy is the template's (checked below); moto would apply its Deny unconditionally.
    with pytest.raises(s3.exceptions.ClientError):
        s3.get_bucket_policy(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="recordings/probe.mp3", Body=b"ID3")
    (policy,) = [r for r in stack.load_template()["Resources"].values() if r["Type"] == "AWS::S3::BucketPolicy"]
    (deny,) = policy["Properties"]["PolicyDocument"]["Statement"]
    assert deny["Effect"] == "Deny" and deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_deploy_with_retention_days_7(aws):
    env = stack.deploy(stage="local", parameters={"RetentionDays": 7})
    assert lifecycle(env["RECORDINGS_BUCKET"]) == stack.template_lifecycle_rules(7)
    assert stack.template_lifecycle_rules(7) != stack.template_lifecycle_rules(30)


def test_deploy_creates_the_alerts_topic(aws):
    env = stack.deploy(stage="local")
    assert env["ALERTS_TOPIC_ARN"] == "arn:aws:sns:us-east-1:123456789012:callbridge-local-alerts"
    topics = [t["TopicArn"] for t in boto3.client("sns").list_topics()["Topics"]]
    assert topics == [env["ALERTS_TOPIC_ARN"]]
    assert boto3.client("sns").list_subscriptions()["Subscriptions"] == []  # AlertEmail empty: none


def test_deploy_twice_is_idempotent(aws):
    params = {"AlertEmail": "ops@example.com"}
    first = stack.deploy(stage="local", parameters=params)
    sqs = boto3.client("sqs")
    url = sqs.get_queue_url(QueueName=first["INTAKE_QUEUE"])["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="survives")
    boto3.client("dynamodb").put_item(TableName=first["STATE_TABLE"], Item={"pk": {"S": "a"}, "sk": {"S": "b"}})

    assert stack.deploy(stage="local", parameters=params) == first

    cfn = boto3.client("cloudformation")
    (only,) = cfn.describe_stacks()["Stacks"]
    assert (only["StackName"], only["StackStatus"]) == ("callbridge-local", "CREATE_COMPLETE")  # no update
    assert len(sqs.list_queues()["QueueUrls"]) == 2 * len(KINDS)
    assert len(boto3.client("s3").list_buckets()["Buckets"]) == 1
    subscriptions = boto3.client("sns").list_subscriptions()["Subscriptions"]
    assert [(s["Protocol"], s["Endpoint"]) for s in subscriptions] == [("email", "ops@example.com")]
    message = sqs.receive_message(QueueUrl=url)["Messages"][0]
    assert message["Body"] == "survives"
    assert boto3.client("dynamodb").get_item(TableName=first["STATE_TABLE"], Key={"pk": {"S": "a"}, "sk": {"S": "b"}})[
        "Item"
    ]


def test_deploy_with_changed_parameters_updates_the_stack(aws):
    env = stack.deploy(stage="local")
    sqs = boto3.client("sqs")
    url = sqs.get_queue_url(QueueName=env["RECORDINGS_QUEUE"])["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="kept")

    assert stack.deploy(stage="local", parameters={"RetentionDays": 7}) == env

    (only,) = boto3.client("cloudformation").describe_stacks()["Stacks"]
    assert only["StackStatus"] == "UPDATE_COMPLETE"
    assert {p["ParameterKey"]: p["ParameterValue"] for p in only["Parameters"]}["RetentionDays"] == "7"
    assert lifecycle(env["RECORDINGS_BUCKET"]) == stack.template_lifecycle_rules(7)
    assert sqs.receive_message(QueueUrl=url)["Messages"][0]["Body"] == "kept"


def test_deploy_rejects_bad_parameters_before_creating_anything(aws):
    with pytest.raises(ValueError, match="Stage"):
        stack.deploy(stage="Local_Stage")
    with pytest.raises(ValueError, match="RetentionDays"):
        stack.deploy(stage="local", parameters={"RetentionDays": 0})
    with pytest.raises(ValueError, match="unknown"):
        stack.deploy(stage="local", parameters={"Retention": 7})
    assert boto3.client("cloudformation").describe_stacks()["Stacks"] == []


def test_env_matches_functions_resources_defaults(aws, monkeypatch):
    from functions.core import resources

    env = stack.deploy(stage="local")
    assert set(env) == ENV_KEYS
    monkeypatch.setenv("CALLBRIDGE_STAGE", env["CALLBRIDGE_STAGE"])
    for kind in KINDS:
        assert env[f"{kind.upper()}_QUEUE"] == resources.queue_name(kind)
        assert env[f"{kind.upper()}_DLQ"] == resources.dlq_name(kind)
    assert env["STATE_TABLE"] == resources.table_name()
    # The bucket name carries the account id (global namespace), so the app must get RECORDINGS_BUCKET.
    assert env["RECORDINGS_BUCKET"].startswith(resources.bucket_name() + "-")


def test_cli_prints_the_environment(aws, capsys):
    assert stack.main(["--stage", "local"]) == 0
    printed = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert printed == stack.deploy(stage="local")


# --- IAM policy files ----------------------------------------------------------------------------------


# The IAM policy files (one per function) are checked in tests/test_iam.py, against this template too.


# --- CloudWatch: alarms and the dashboard (issue 11 item 4) -----------------------------------------------


def _app_handlers() -> list[str]:
    """The event handlers of app.py (each its own Lambda function, callbridge-<stage>-<name>)."""
    import re

    text = (ROOT / "app.py").read_text(encoding="utf-8")
    return re.findall(r"@app\.(?:on_\w+|schedule|lambda_function)\((?:[^()]|\([^()]*\))*\)\s*\ndef (\w+)", text)


def _alarms() -> dict[str, dict]:
    return {name: r["Properties"] for name, r in stack.load_template()["Resources"].items()
            if r["Type"] == "AWS::CloudWatch::Alarm"}


def _emitted_metrics() -> dict[str, set[frozenset]]:
    """metric name -> the sets of extra dimension names functions/ emits it with (`metric("Name", ..., dim=...)`)."""
    import ast

    found: dict[str, set[frozenset]] = {}
    for path in (ROOT / "functions").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "metric"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                dims = frozenset(k.arg for k in node.keywords if k.arg not in ("unit", None))
                found.setdefault(node.args[0].value, set()).add(dims)
    return found


def test_every_handler_of_the_app_has_an_errors_alarm():
    handlers = _app_handlers()
    assert {"intake_worker", "callback_worker", "subscription_keeper"} <= set(handlers)
    watched = {a["Dimensions"][0]["Value"]["Fn::Sub"] for a in _alarms().values()
               if a.get("Namespace") == "AWS/Lambda" and a["MetricName"] == "Errors"}
    # The API's function is callbridge-<stage>; every other one callbridge-<stage>-<handler>.
    assert watched == {"callbridge-${Stage}"} | {f"callbridge-${{Stage}}-{h}" for h in handlers}, \
        "add (or remove) the handler's <Name>ErrorsAlarm in infra/template.yaml"


def test_the_app_metric_alarms_watch_what_the_code_emits_with_its_dimensions():
    import re

    emitted = _emitted_metrics()
    app_alarms = [a for a in _alarms().values() if a.get("Namespace") == "callbridge" or "Metrics" in a]
    names = set()
    for alarm in app_alarms:
        if "Metrics" in alarm:  # a Metrics Insights query: SELECT SUM(M) FROM SCHEMA(callbridge, d1, stage) ...
            query = alarm["Metrics"][0]["Expression"]["Fn::Sub"]
            pattern = r"SELECT SUM\((\w+)\) FROM SCHEMA\(([^)]*)\) WHERE stage = '\$\{Stage\}'"
            metric_name, schema = re.fullmatch(pattern, query).groups()
            namespace, *dims = [part.strip() for part in schema.split(",")]
            assert namespace == "callbridge"
        else:
            metric_name, dims = alarm["MetricName"], [d["Name"] for d in alarm["Dimensions"]]
            assert alarm["Dimensions"][0] == {"Name": "stage", "Value": {"Ref": "Stage"}}
        names.add(metric_name)
        assert "stage" in dims
        assert frozenset(dims) - {"stage"} in emitted.get(metric_name, set()), (metric_name, dims)
    assert {"ProviderAuthFailed", "SubscriptionRenewFailed", "BudgetUsedPercent", "ChannelsBusyPercent",
            "ConfigErrors"} <= names


def test_the_budget_channel_and_config_alarms_have_their_thresholds():
    alarms = {a["AlarmName"]["Fn::Sub"].removeprefix("callbridge-${Stage}-"): a for a in _alarms().values()}
    assert (alarms["budget-80-percent"]["Threshold"], alarms["budget-100-percent"]["Threshold"]) == (80, 100)
    assert alarms["channels-80-percent"]["Threshold"] == 80
    for name in ("budget-80-percent", "budget-100-percent", "channels-80-percent"):
        assert alarms[name]["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    assert (alarms["config-error"]["Period"], alarms["config-error"]["EvaluationPeriods"]) == (60, 1)  # at once
    assert {alarms[f"{p}-token-rejected"]["Dimensions"][1]["Value"] for p in ("beeline", "salesrender")} == {
        "beeline", "salesrender"}
    for alarm in alarms.values():
        assert alarm["AlarmActions"] == [{"Ref": "AlertsTopic"}]


def test_the_dashboard_is_json_and_shows_every_alarm():
    import re

    (dashboard,) = [r["Properties"] for r in stack.load_template()["Resources"].values()
                    if r["Type"] == "AWS::CloudWatch::Dashboard"]
    assert dashboard["DashboardName"] == {"Fn::Sub": "callbridge-${Stage}"}
    text = dashboard["DashboardBody"]["Fn::Sub"]
    assert set(re.findall(r"\$\{([^}]+)\}", text)) <= {"Stage", "AWS::Region", "AWS::AccountId", "AWS::Partition"}
    body = json.loads(re.sub(r"\$\{[^}]+\}", "x", text))
    (alarm_widget,) = [w for w in body["widgets"] if w["type"] == "alarm"]
    shown = {arn.rsplit(":alarm:callbridge-x-", 1)[1] for arn in alarm_widget["properties"]["alarms"]}
    assert shown == {a["AlarmName"]["Fn::Sub"].removeprefix("callbridge-${Stage}-") for a in _alarms().values()}
    emitted = _emitted_metrics()
    for name in re.findall(r'MetricName=\\"(\w+)\\"', text) + re.findall(r'\["callbridge", "(\w+)"', text):
        assert name in emitted, f"the dashboard shows {name}, which functions/ never emits"
