"""The functions' IAM policy (infra/deploy.py GRANTS) is exactly what functions/ calls, nothing more.

The calls are collected from the source: `resources.client("svc").op(...)`, `resources.table().op(...)`,
presigned URLs (signed with the role's credentials), and Powertools' own calls (idempotency's DynamoDB
persistence layer, read from Powertools' source; Parameters' SSM read). Lambda itself needs logs and,
for the SQS event-source mappings, receive/delete/attributes: those are listed here with the reason.
"""

from __future__ import annotations

import ast
import json
import re
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

from infra import deploy

ROOT = Path(__file__).resolve().parents[1]
# Run by a person with their own credentials, never by a Lambda function.
# The doctor (make doctor, and the last step of make deploy) reads the stack, the bucket and the queues with
# the operator's credentials; what it reaches through domain modules is the functions' own calls, granted.
OPERATOR_TOOLS = {"functions/core/replay_dlq.py", "functions/insight/doctor.py"}
PLATFORM = {
    "logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents",  # Lambda writes the function's logs
    "sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes",  # event-source mappings poll as the role
    "kms:Decrypt",  # SecureString parameters are decrypted with the role's rights (through SSM only)
}
SERVICE_PREFIX = {"dynamodb": "dynamodb", "sqs": "sqs", "s3": "s3", "ssm": "ssm", "sns": "sns"}


def _action(service: str, op: str) -> str:
    return f"{SERVICE_PREFIX.get(service, service)}:{''.join(part.capitalize() for part in op.split('_'))}"


def _is_resources_call(node: ast.AST, name: str) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "resources")


def calls_in(source: str, module: str) -> set[str]:
    """IAM actions of the boto3 calls one module makes."""
    tree = ast.parse(source)
    found = set()
    local_resources = module == "functions/core/resources.py"
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        target, op = node.func.value, node.func.attr
        if op == "transact_write_items":
            found |= transaction_actions(node)
        elif _is_resources_call(target, "client") or (local_resources and isinstance(target, ast.Call)
                                                    and isinstance(target.func, ast.Name)
                                                    and target.func.id == "client"):
            service = target.args[0].value
            found.add(_action(service, op))
        elif _is_resources_call(target, "table"):
            found.add(_action("dynamodb", op))
        elif op == "generate_presigned_url" and node.args and isinstance(node.args[0], ast.Constant):
            found.add(_action("s3", node.args[0].value))
        elif op == "get_parameter" and isinstance(target, ast.Name) and target.id == "parameters":
            found.add("ssm:GetParameter")  # Powertools' SSMProvider._get calls ssm get_parameter
    if "DynamoDBPersistenceLayer" in source:
        found |= powertools_idempotency_calls()
    return found


TRANSACTION_ITEM = {"Put": "dynamodb:PutItem", "Update": "dynamodb:UpdateItem", "Delete": "dynamodb:DeleteItem",
                    "ConditionCheck": "dynamodb:ConditionCheckItem"}


def transaction_actions(call: ast.Call) -> set[str]:
    """IAM authorises a TransactWriteItems by each item's own action (Update -> UpdateItem, ...)."""
    (items,) = [k.value for k in call.keywords if k.arg == "TransactItems"]
    assert isinstance(items, ast.List), "TransactItems must be a literal list for the IAM scan to read it"
    actions = set()
    for item in items.elts:
        assert isinstance(item, ast.Dict), "each transaction item must be a literal {kind: ...}"
        actions |= {TRANSACTION_ITEM[k.value] for k in item.keys}
    return actions


def powertools_idempotency_calls() -> set[str]:
    import aws_lambda_powertools.utilities.idempotency.persistence.dynamodb as persistence

    text = Path(persistence.__file__).read_text(encoding="utf-8")
    return {_action("dynamodb", op) for op in re.findall(r"self\.client\.(\w+)\(", text)}


def collected() -> set[str]:
    actions = set()
    for path in sorted((ROOT / "functions").rglob("*.py")):
        module = path.relative_to(ROOT).as_posix()
        if module not in OPERATOR_TOOLS:
            actions |= calls_in(path.read_text(encoding="utf-8"), module)
    return actions


def granted(policy: dict) -> set[str]:
    return {a for s in policy["Statement"] for a in s["Action"]}


def test_the_scan_finds_the_calls_it_is_meant_to_find():
    assert calls_in('resources.client("sqs").send_message(QueueUrl=u)', "x") == {"sqs:SendMessage"}
    assert calls_in("resources.table().query(IndexName='by_phone')", "x") == {"dynamodb:Query"}
    assert calls_in('resources.client("dynamodb").transact_write_items(TransactItems=[{"Update": a}, '
                    '{"ConditionCheck": b}])', "x") == {"dynamodb:UpdateItem", "dynamodb:ConditionCheckItem"}
    assert calls_in('c.generate_presigned_url("get_object", Params={})', "x") == {"s3:GetObject"}
    assert {"dynamodb:PutItem", "dynamodb:GetItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem"} <= \
        powertools_idempotency_calls()


def test_every_call_is_granted_and_every_grant_is_used():
    policy = deploy.policy_document("prod", deploy.offline_outputs("prod"), "123456789012", "eu-central-1")
    calls = collected()
    assert calls - granted(policy) == set(), "called by functions/ but not granted (infra/deploy.py GRANTS)"
    assert granted(policy) - calls - PLATFORM == set(), "granted but never called: remove it from GRANTS"


@pytest.mark.parametrize("stage", ["dev", "prod"])
def test_committed_policy_files_grant_what_the_generator_grants(stage):
    committed = json.loads((ROOT / ".chalice" / f"policy-{stage}.json").read_text(encoding="utf-8"))
    assert committed == deploy.policy_document(stage, deploy.offline_outputs(stage), "*", "*")


def test_the_generated_policy_names_only_this_stages_resources():
    outputs = {k: v.replace("-*", "-123456789012") for k, v in deploy.offline_outputs("prod").items()}
    policy = deploy.policy_document("prod", outputs, "123456789012", "eu-central-1")
    resources = [r for s in policy["Statement"] for r in s["Resource"]]
    other = deploy.policy_document("dev", deploy.offline_outputs("dev"), "123456789012", "eu-central-1")
    for arn in (r for s in other["Statement"] if s["Sid"] != "DecryptSecureStringsThroughSsm" for r in s["Resource"]):
        assert not any(fnmatchcase(arn, mine) for mine in resources), arn
    assert all("callbridge-prod" in r or "/callbridge/prod/" in r or r.endswith(":key/*") for r in resources)
    assert "arn:aws:dynamodb:eu-central-1:123456789012:table/callbridge-prod-state/index/*" in resources
