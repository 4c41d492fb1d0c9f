"""Each Lambda function's IAM policy (infra/deploy.py FUNCTION_CALLS) is exactly what its code calls.

A function is app.py's `api_handler` (every route) or one `@app.on_sqs_message` / `@app.schedule` handler.
Its code is the closure of the modules it imports: app.py's module-level imports, the lazy imports in its
handler's body (in any route's body, for the API), then every functions/ module those import, transitively.
Module granularity: a module's calls count for every function that imports it, used or not.

The calls are collected from the source: `resources.client("svc").op(...)`, `resources.table().op(...)`,
presigned URLs (signed with the role's credentials), and Powertools' own calls (idempotency's DynamoDB
persistence layer, read from Powertools' source; Parameters' SSM read). What Lambda itself does with a
function's role is PLATFORM, granted by rule: listed below with the reason.
"""

from __future__ import annotations

import ast
import json
import re
from fnmatch import fnmatchcase
from functools import cache
from pathlib import Path

import pytest

from functions.core.resources import QUEUES
from infra import deploy
from infra.local import stack

ROOT = Path(__file__).resolve().parents[1]
# Run by a person with their own credentials, never by a Lambda function: no function may import them.
# The doctor (make doctor, and the last step of make deploy) reads the stack, the bucket and the queues with
# the operator's credentials; what it reaches through domain modules is the functions' own calls, granted.
OPERATOR_TOOLS = {"functions/core/replay_dlq.py", "functions/insight/doctor.py",
                  "functions/providers/salesrender/introspect.py"}  # the doctor's SalesRender look-ups
PLATFORM_REASONS = {
    "logs:CreateLogGroup": "every function: Lambda writes its logs with the function's role",
    "logs:CreateLogStream": "every function: Lambda writes its logs with the function's role",
    "logs:PutLogEvents": "every function: Lambda writes its logs with the function's role",
    "sqs:ReceiveMessage": "SQS handlers only: the event-source mapping polls the queue with the function's role",
    "sqs:DeleteMessage": "SQS handlers only: the mapping deletes a message the handler returned from",
    "sqs:GetQueueAttributes": "SQS handlers only: the mapping reads the queue's attributes",
    "kms:Decrypt": "functions reading secrets only: SSM decrypts SecureStrings with the caller's rights",
}
SERVICE_PREFIX = {"dynamodb": "dynamodb", "sqs": "sqs", "s3": "s3", "ssm": "ssm", "sns": "sns"}
HANDLER_DECORATORS = ("on_sqs_message", "schedule", "on_sns_message", "on_s3_event", "lambda_function",
                      "on_cw_event", "on_ws_message", "on_ws_connect", "on_ws_disconnect")


# --- the calls one module makes ---------------------------------------------------------------------------


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


@cache
def powertools_idempotency_calls() -> set[str]:
    import aws_lambda_powertools.utilities.idempotency.persistence.dynamodb as persistence

    text = Path(persistence.__file__).read_text(encoding="utf-8")
    return {_action("dynamodb", op) for op in re.findall(r"self\.client\.(\w+)\(", text)}


# --- which modules each function runs ---------------------------------------------------------------------


def module_file(name: str) -> str | None:
    """functions.a.b -> functions/a/b.py (or the package's __init__.py); None for anything else."""
    for candidate in (name.replace(".", "/") + ".py", name.replace(".", "/") + "/__init__.py"):
        if name.split(".")[0] == "functions" and (ROOT / candidate).is_file():
            return candidate
    return None


def imported_modules(tree: ast.AST) -> set[str]:
    """The functions/ modules a piece of code imports, anywhere in it (lazy imports in bodies included)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pkg import module`
    names = {n for n in found if module_file(n)}
    # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
    return names | {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)}


def closure(roots: set[str]) -> set[str]:
    """The files of the modules `roots` import, transitively."""
    files, todo, seen = set(), list(roots), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        files.add(path)
        todo.extend(imported_modules(ast.parse((ROOT / path).read_text(encoding="utf-8"))))
    return files


def _decorator(node: ast.expr) -> str | None:
    """`@app.on_sqs_message(...)` -> 'on_sqs_message'."""
    call = node.func if isinstance(node, ast.Call) else node
    if isinstance(call, ast.Attribute) and isinstance(call.value, ast.Name) and call.value.id == "app":
        return call.attr
    return None


def app_functions(source: str) -> dict[str, set[str]]:
    """app.py's Lambda functions and the modules each imports directly (its roots)."""
    tree = ast.parse(source)
    everywhere, handlers, api = set(), {}, set()
    for node in tree.body:
        kinds = [_decorator(d) for d in getattr(node, "decorator_list", [])]
        if any(k in HANDLER_DECORATORS for k in kinds):
            handlers[node.name] = imported_modules(node)
        elif "route" in kinds:
            api |= imported_modules(node)
        else:
            everywhere |= imported_modules(node)  # module level, and helpers any function may call
    return {"api_handler": everywhere | api, **{name: everywhere | roots for name, roots in handlers.items()}}


def sqs_queues(source: str) -> dict[str, str]:
    """The queue kind of each SQS handler: `queue=resources.queue_name("<kind>")`."""
    found = {}
    for node in ast.parse(source).body:
        for decorator in getattr(node, "decorator_list", []):
            if _decorator(decorator) == "on_sqs_message":
                (queue,) = [k.value for k in decorator.keywords if k.arg == "queue"]
                assert ast.unparse(queue.func) == "resources.queue_name", ast.unparse(queue)
                found[node.name] = queue.args[0].value
    return found


APP = (ROOT / "app.py").read_text(encoding="utf-8")


@cache
def modules_of(function: str) -> frozenset[str]:
    return frozenset(closure(app_functions(APP)[function]))


@cache
def needed(function: str) -> frozenset[str]:
    """What the function's code can call."""
    return frozenset(a for path in modules_of(function)
                     for a in calls_in((ROOT / path).read_text(encoding="utf-8"), path))


def platform(function: str) -> set[str]:
    """What Lambda does with the function's role (PLATFORM_REASONS)."""
    actions = {"logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"}
    if function in sqs_queues(APP):
        actions |= {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"}
    if "ssm:GetParameter" in needed(function):
        actions.add("kms:Decrypt")
    return actions


def granted(policy: dict) -> set[str]:
    return {a for s in policy["Statement"] for a in s["Action"]}


def allowed(policy: dict, action: str, resource: str) -> bool:
    """A minimal IAM evaluation (Allow statements, wildcards in resources), enough for these files."""
    return any(s["Effect"] == "Allow" and action in s["Action"] and any(fnmatchcase(resource, r) for r in s["Resource"])
               for s in policy["Statement"])


def prod_policy(function: str) -> dict:
    return deploy.policy_document(function, "prod", deploy.offline_outputs("prod"), "123456789012", "eu-central-1")


FUNCTIONS = sorted(deploy.FUNCTION_CALLS)


# --- the scan itself --------------------------------------------------------------------------------------


def test_the_scan_finds_the_calls_it_is_meant_to_find():
    assert calls_in('resources.client("sqs").send_message(QueueUrl=u)', "x") == {"sqs:SendMessage"}
    assert calls_in("resources.table().query(IndexName='by_phone')", "x") == {"dynamodb:Query"}
    assert calls_in('resources.client("dynamodb").transact_write_items(TransactItems=[{"Update": a}, '
                    '{"ConditionCheck": b}])', "x") == {"dynamodb:UpdateItem", "dynamodb:ConditionCheckItem"}
    assert calls_in('c.generate_presigned_url("get_object", Params={})', "x") == {"s3:GetObject"}
    assert {"dynamodb:PutItem", "dynamodb:GetItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem"} <= \
        powertools_idempotency_calls()


def test_the_closure_follows_lazy_and_transitive_imports_per_function():
    source = ("from functions.core import resources\n"
              "@app.route('/a')\ndef a():\n    from functions.crm import postbacks\n"
              "@app.on_sqs_message(queue=resources.queue_name('cdrs'), batch_size=1)\n"
              "def cdr_worker(event):\n    from functions.crm import cdr\n"
              "@app.schedule(Rate(1, unit=Rate.MINUTES))\ndef sweeper(event):\n    import functions.calling.dispatch\n")
    roots = app_functions(source)
    assert set(roots) == {"api_handler", "cdr_worker", "sweeper"}
    assert roots["api_handler"] == {"functions", "functions.core", "functions.core.resources", "functions.crm",
                                    "functions.crm.postbacks"}
    assert "functions.crm.cdr" in roots["cdr_worker"] and "functions.crm.postbacks" not in roots["cdr_worker"]
    assert "functions.calling.dispatch" in roots["sweeper"]
    assert sqs_queues(source) == {"cdr_worker": "cdrs"}
    # Transitively: the dialer imports records/leads.py, which the callback worker never names itself.
    callback = modules_of("callback_worker")
    assert {"functions/calling/dialer.py", "functions/records/leads.py", "functions/core/queues.py"} <= callback
    assert "functions/postcall/recorder.py" not in callback and "functions/postcall/recording_links.py" not in callback


def test_every_module_runs_in_some_function_and_operator_tools_in_none():
    reached = set().union(*(modules_of(f) for f in FUNCTIONS))
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "functions").rglob("*.py")}
    assert modules - reached == OPERATOR_TOOLS, "a module no function imports: an import form the scan misses?"
    assert reached & OPERATOR_TOOLS == set(), "a Lambda function imports an operator tool"


# --- per function: every call granted, every grant used ---------------------------------------------------


def test_every_function_of_app_py_has_its_own_policy():
    assert set(deploy.FUNCTION_CALLS) == set(app_functions(APP)), "app.py's functions vs infra/deploy.py"
    assert deploy.EVENT_QUEUES == sqs_queues(APP)
    assert set(deploy.EVENT_QUEUES.values()) == set(QUEUES)


@pytest.mark.parametrize("function", FUNCTIONS)
def test_each_function_is_granted_exactly_what_its_code_calls(function):
    calls = set(deploy.FUNCTION_CALLS[function])
    assert set(needed(function)) - calls == set(), f"called by {function}'s modules, not in FUNCTION_CALLS"
    assert calls - set(needed(function)) == set(), f"in FUNCTION_CALLS[{function!r}], never called by its modules"
    policy = prod_policy(function)
    assert granted(policy) - needed(function) - platform(function) == set(), "granted but never used"
    assert (needed(function) | platform(function)) - granted(policy) == set(), "needed but not granted"
    assert platform(function) <= set(PLATFORM_REASONS)
    assert all(s["Action"] for s in policy["Statement"])


def test_least_privilege_is_real():
    """Functions lack what only others need: the per-function split is not one policy under nine names."""
    policies = {f: prod_policy(f) for f in FUNCTIONS}
    # Only the recorder uploads recordings, and only the webhooks (the API) keep oversized rejected posts.
    assert {f for f in FUNCTIONS if "s3:PutObject" in granted(policies[f])} == {"api_handler", "recording_worker"}
    for function in ("subscription_keeper", "dispatch_sweeper"):
        assert not granted(policies[function]) & {"s3:PutObject", "s3:GetObject"}, function
    # A recording link is presigned (a GET) only when it is followed, by the API; the workers that write the
    # stable link (core/links.py: an HMAC, no S3) may not read recordings.
    assert {f for f in FUNCTIONS if "s3:GetObject" in granted(policies[f])} == {"api_handler"}
    assert not granted(policies["dispatch_sweeper"]) & {"ssm:GetParameter", "kms:Decrypt"}
    assert "sqs:SendMessage" not in granted(policies["subscription_keeper"])
    assert "sns:Publish" not in granted(policies["intake_worker"]) | granted(policies["recording_worker"])
    assert not granted(policies["api_handler"]) & {"sqs:ReceiveMessage", "sqs:DeleteMessage"}
    # Resources: its own queue to poll, its own log group.
    callback = policies["callback_worker"]
    arn = "arn:aws:sqs:eu-central-1:123456789012:callbridge-prod-{}"
    assert allowed(callback, "sqs:ReceiveMessage", arn.format("callbacks"))
    assert not allowed(callback, "sqs:ReceiveMessage", arn.format("intake"))
    assert allowed(callback, "sqs:SendMessage", arn.format("recordings"))  # queues.send reaches any stage queue
    group = "arn:aws:logs:eu-central-1:123456789012:log-group:/aws/lambda/callbridge-prod-{}:log-stream:x"
    assert allowed(callback, "logs:PutLogEvents", group.format("callback_worker"))
    assert not allowed(callback, "logs:PutLogEvents", group.format("intake_worker"))
    api_group = "arn:aws:logs:eu-central-1:123456789012:log-group:/aws/lambda/callbridge-prod"
    assert allowed(policies["api_handler"], "logs:CreateLogGroup", api_group)
    assert not allowed(callback, "logs:CreateLogGroup", api_group)


# --- the files Chalice deploys ----------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["dev", "prod"])
def test_committed_policy_files_grant_what_the_generator_grants(stage):
    chalice_dir = ROOT / ".chalice"
    expected = deploy.function_policies(stage, deploy.offline_outputs(stage), "*", "*")
    for function, document in expected.items():
        committed = json.loads((chalice_dir / deploy.policy_file_name(stage, function)).read_text(encoding="utf-8"))
        assert committed == document, function
    # No stale stage-wide policy-<stage>.json: Chalice falls back to it for a function without its own entry.
    assert {p.name for p in chalice_dir.glob(f"policy-{stage}*.json")} == \
        {deploy.policy_file_name(stage, f) for f in expected}
    entry = deploy.load_chalice_config()["stages"][stage]
    assert "iam_policy_file" not in entry
    assert {f: s["iam_policy_file"] for f, s in entry["lambda_functions"].items()} == \
        {f: deploy.policy_file_name(stage, f) for f in expected}


def test_the_generated_policies_name_only_this_stages_resources():
    outputs = {k: v.replace("-*", "-123456789012") for k, v in deploy.offline_outputs("prod").items()}
    for function in FUNCTIONS:
        policy = deploy.policy_document(function, "prod", outputs, "123456789012", "eu-central-1")
        resources = [r for s in policy["Statement"] for r in s["Resource"]]
        other = deploy.policy_document(function, "dev", deploy.offline_outputs("dev"), "123456789012", "eu-central-1")
        for arn in (r for s in other["Statement"] if s["Sid"] != "DecryptSecureStringsThroughSsm"
                    for r in s["Resource"]):
            assert not any(fnmatchcase(arn, mine) for mine in resources), (function, arn)
        assert all("callbridge-prod" in r or "/callbridge/prod/" in r or r.endswith(":key/*") for r in resources)
        assert "arn:aws:dynamodb:eu-central-1:123456789012:table/callbridge-prod-state/index/*" in resources


def template_arns(stage: str, function: str) -> dict[str, list[str]]:
    """ARNs of the stage's resources a function reaches, named from infra/template.yaml itself."""
    template = stack.load_template()
    resolver = stack.Resolver(template, stack._parameter_values(template, {"Stage": stage}),
                              stack._pseudo_parameters("123456789012", "eu-central-1", f"callbridge-{stage}"))
    names = {name: resolver.resolve(r["Properties"][key]) for name, r in template["Resources"].items()
             for key in ("QueueName", "TableName", "BucketName", "TopicName") if key in r.get("Properties", {})}
    prefix = "arn:aws:{}:eu-central-1:123456789012:"
    table = prefix.format("dynamodb") + "table/" + names["StateTable"]
    group = prefix.format("logs") + f"log-group:/aws/lambda/{deploy.lambda_name(stage, function)}"
    own = deploy.EVENT_QUEUES.get(function)
    return {
        "sqs": [prefix.format("sqs") + names[f"{k.capitalize()}{s}"] for k in QUEUES for s in ("Queue", "Dlq")],
        "sqs-own": [prefix.format("sqs") + names[f"{own.capitalize()}Queue"]] if own else [],
        "dynamodb": [table, table + "/index/by-phone"],
        "s3": ["arn:aws:s3:::" + names["RecordingsBucket"] + "/recordings/2026/01/call.mp3"],
        "sns": [prefix.format("sns") + names["AlertsTopic"]],
        "ssm": [prefix.format("ssm") + f"parameter/callbridge/{stage}/beeline_api_token"],
        "logs-group": [group],
        "logs-stream": [group + ":log-stream:2026/01/01/[$LATEST]abc"],
    }


ACTION_KIND = {"sqs:ReceiveMessage": "sqs-own", "sqs:DeleteMessage": "sqs-own", "sqs:GetQueueAttributes": "sqs-own",
               "logs:CreateLogGroup": "logs-group", "logs:CreateLogStream": "logs-stream",
               "logs:PutLogEvents": "logs-stream"}


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("stage,other", [("dev", "prod"), ("prod", "dev")])
def test_each_policy_reaches_its_stages_resources_only(stage, other, function):
    policy = json.loads((ROOT / ".chalice" / deploy.policy_file_name(stage, function)).read_text(encoding="utf-8"))
    mine, theirs = template_arns(stage, function), template_arns(other, function)
    for action in granted(policy) - {"kms:Decrypt"}:
        kind = ACTION_KIND.get(action) or action.split(":")[0]
        assert mine[kind], (action, kind)
        for arn in mine[kind]:
            assert allowed(policy, action, arn), (action, arn)
        for arn in theirs[kind]:
            assert not allowed(policy, action, arn), (action, arn)
    for statement in policy["Statement"]:
        assert all("*" not in a for a in statement["Action"]) and statement["Resource"] != "*", statement
    for kms in (s for s in policy["Statement"] if "kms:Decrypt" in s["Action"]):
        assert kms["Condition"] == {"StringLike": {"kms:ViaService": "ssm.*.amazonaws.com"}}


# --- the package check: its own role, its own policy ------------------------------------------------------


def fake_package(policies: dict[str, dict]) -> dict:
    """A `chalice package` template as Chalice 1.34 writes it: one role per function (<Function>Role)."""
    from chalice.utils import to_cfn_resource_name

    resources = {}
    for function, policy in policies.items():
        key = "APIHandler" if function == "api_handler" else to_cfn_resource_name(function)
        role = to_cfn_resource_name(f"{function}_role")
        resources[role] = {"Type": "AWS::IAM::Role", "Properties": {"Policies": [
            {"PolicyDocument": policy, "PolicyName": f"{role}Policy"}]}}
        events = {}
        if function in deploy.EVENT_QUEUES:
            queue = {"Fn::Sub": f"arn:${{AWS::Partition}}:sqs:${{AWS::Region}}:${{AWS::AccountId}}:"
                                f"callbridge-prod-{deploy.EVENT_QUEUES[function]}"}
            events[f"{key}SqsEventSource"] = {"Type": "SQS", "Properties": {
                "Queue": queue, "BatchSize": 1, "ScalingConfig": {"MaximumConcurrency": 5}}}
        resources[key] = {"Type": "AWS::Serverless::Function", "Properties": {
            "Role": {"Fn::GetAtt": [role, "Arn"]}, "Events": events}}
    return {"Resources": resources}


def check(sam: dict, policies: dict[str, dict]) -> list[str]:
    queues = {f"callbridge-prod-{q}" for q in QUEUES}
    return deploy.check_package(sam, "prod", {}, queues, policies, 5, "callbridge-prod-callbacks")


def test_the_package_check_wants_each_function_on_its_own_role_with_its_own_policy():
    policies = {f: prod_policy(f) for f in FUNCTIONS}
    assert check(fake_package(policies), policies) == []

    shared = fake_package(policies)  # the old layout: every function on one role with one policy
    for resource in shared["Resources"].values():
        if resource["Type"] == "AWS::Serverless::Function":
            resource["Properties"]["Role"] = {"Fn::GetAtt": ["ApiHandlerRole", "Arn"]}
    problems = check(shared, policies)
    assert "ApiHandlerRole: the role of 9 functions (APIHandler, CallReconciler, CallbackWorker, CdrWorker, " \
           "DispatchSweeper, IntakeWorker, PostbackWorker, RecordingWorker, SubscriptionKeeper), " \
           "each needs its own" in problems
    assert "CallbackWorker: its role ApiHandlerRole does not hold exactly .chalice/policy-prod-callback_worker.json" \
        in problems

    swapped = fake_package({**policies, "callback_worker": policies["recording_worker"]})
    assert check(swapped, policies) == [
        "CallbackWorker: its role CallbackWorkerRole does not hold exactly .chalice/policy-prod-callback_worker.json"]

    elsewhere = fake_package({**policies, "recording_worker": policies["intake_worker"]})
    assert "RecordingWorker: polls ['callbridge-prod-recordings'], its policy lets it poll " \
           "['callbridge-prod-intake']" in check(elsewhere, {**policies, "recording_worker": policies["intake_worker"]})

    extra = fake_package({**policies, "new_worker": policies["dispatch_sweeper"]})
    assert check(extra, policies) == ["NewWorker: a function infra/deploy.py has no policy for (add it to "
                                      "FUNCTION_CALLS)", "NewWorkerRole: a role no checked function uses"]
