"""Deploy a stage of callbridge to AWS with one command (R-27), and take it down again.

    python -m infra.deploy deploy --stage prod        # make deploy STAGE=prod
    python -m infra.deploy destroy --stage prod [--delete-bucket] [--yes]
    python -m infra.deploy package --stage dev --out build/dev

`deploy`, in order, each step idempotent so that a second run changes nothing:
1. validates config/<stage>.yaml (errors name the key) and that the stage is one fact: the shell's
   CALLBRIDGE_STAGE/CALLBRIDGE_CONFIG and the stage's entry in .chalice/config.json must agree with --stage;
2. creates the CloudFormation stack callbridge-<stage> from infra/template.yaml, or updates it through a
   change set ("no changes" is success, and the empty change set is deleted);
3. creates the SSM SecureStrings /callbridge/<stage>/<name> that are missing: generated for the secrets
   callbridge owns, read from the environment or asked for (no echo) for the ones a provider issues.
   Existing ones are never overwritten and no value is ever printed;
4. writes the stack outputs into stages.<stage>.environment_variables of .chalice/config.json and one IAM
   policy per Lambda function (.chalice/policy-<stage>-<function>.json) generated from those outputs;
5. `chalice package` into a scratch directory, byte-compiles the zip (compile_package: .pyc files for the
   runtime's Python with unchecked hashes, also in the cached zip that `chalice deploy` uploads) and checks
   that every function is wired to this stage's queues and names and has its own role with its own policy,
   then `chalice deploy --stage <stage>`;
6. puts the API URL into the stage's environment as PUBLIC_BASE_URL (subscription URL, recording links)
   and deploys again when it changed (only on the first run, or after the API was recreated);
7. applies what Chalice cannot express (log retention of the functions' log groups), runs the doctor
   when there is one, and prints the URLs to paste into Tilda and SalesRender.
"""

from __future__ import annotations

import argparse
import fcntl
import getpass
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from functions.core.resources import QUEUES
from infra.local.stack import OUTPUT_ENV  # the stack outputs resources.py reads, shared with the local stack

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "infra" / "template.yaml"
STAGE_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,19}$")  # the template's Stage AllowedPattern
API_GATEWAY_STAGE = "api"
LOG_RETENTION_DAYS = 30

QUEUE_OUTPUTS = [k for k in OUTPUT_ENV if k.endswith(("QueueName", "DlqName"))]

# Secrets callbridge makes up itself (the user pastes some into a portal: the Tilda key).
GENERATED_SECRETS = (
    "TILDA_API_KEY",
    "BEELINE_WEBHOOK_SECRET",
    "SALESRENDER_WEBHOOK_SECRET",
    "CALLBRIDGE_API_TOKEN",
    "RECORDING_LINK_SECRET",
    "PLUGIN_ENCRYPTION_KEY",  # encrypts the SalesRender plugin's HPT secret in the state table
)
# Secrets a provider issues: taken from the environment variable of the same name, or asked for.
PROVIDER_SECRETS = {
    "BEELINE_API_TOKEN": "Beeline Cloud PBX portal (Облачная АТС): Settings -> API, the X-MPBX-API-AUTH-TOKEN",
    "SALESRENDER_API_TOKEN": "SalesRender: company settings -> API tokens (a token with order read/write)",
}
COMPANY_ID_HELP = "SalesRender company id: the number in your CRM address, https://<host>/companies/<id>/..."

# Every Lambda function has its own role and policy (.chalice/policy-<stage>-<function>.json). FUNCTION_CALLS
# is what each function's code can call: the boto3 calls of the modules its handler imports, transitively
# (module granularity), with Powertools' own calls. tests/test_iam.py derives it from the source and proves
# this table equal to it both ways, so a new call fails a test until it is granted here, where it is reviewed.
STATE_TABLE_CALLS = ("dynamodb:DeleteItem", "dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:Query",
                     "dynamodb:UpdateItem")  # functions/core/store.py and records/, which every function imports
SEND_CALLS = ("sqs:ChangeMessageVisibility", "sqs:GetQueueUrl", "sqs:SendMessage")  # functions/core/queues.py
FUNCTION_CALLS = {
    # Every route of app.py runs in this one function.
    "api_handler": (*STATE_TABLE_CALLS, *SEND_CALLS, "s3:GetObject", "s3:PutObject", "sns:Publish",
                    "ssm:GetParameter"),
    "intake_worker": (*STATE_TABLE_CALLS, *SEND_CALLS, "ssm:GetParameter"),
    "callback_worker": (*STATE_TABLE_CALLS, *SEND_CALLS, "sns:Publish", "ssm:GetParameter"),
    "recording_worker": (*STATE_TABLE_CALLS, *SEND_CALLS, "s3:PutObject", "ssm:GetParameter"),
    "subscription_keeper": (*STATE_TABLE_CALLS, "sqs:GetQueueUrl", "ssm:GetParameter"),
    "call_reconciler": (*STATE_TABLE_CALLS, *SEND_CALLS, "sns:Publish", "ssm:GetParameter"),
    "dispatch_sweeper": (*STATE_TABLE_CALLS, *SEND_CALLS, "sns:Publish"),
    "postback_worker": (*STATE_TABLE_CALLS, *SEND_CALLS, "sns:Publish", "ssm:GetParameter"),
    "cdr_worker": (*STATE_TABLE_CALLS, *SEND_CALLS, "sns:Publish", "ssm:GetParameter"),
}
# The queue of each app.py @app.on_sqs_message handler (resources.queue_name(<kind>)).
EVENT_QUEUES = {"intake_worker": "intake", "callback_worker": "callbacks", "recording_worker": "recordings",
                "postback_worker": "postbacks", "cdr_worker": "cdrs"}
LOG_CALLS = ("logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents")
# Lambda's event-source mapping polls the function's queue with the function's role.
POLL_CALLS = ("sqs:DeleteMessage", "sqs:GetQueueAttributes", "sqs:ReceiveMessage")

# A policy's statements, as (sid, resource kind, the actions it may hold); a function's statement holds those
# of its actions, and is left out when it has none.
GRANTS = (
    ("WriteOwnLambdaLogs", "own_log_group", LOG_CALLS),
    ("PollOwnEventQueue", "own_queue", POLL_CALLS),
    ("UseStageQueues", "queues", SEND_CALLS),
    ("UseStateTable", "table", STATE_TABLE_CALLS),
    ("UseRecordingsBucket", "bucket_objects", ("s3:GetObject", "s3:PutObject")),
    ("ReadStageSecrets", "ssm_parameters", ("ssm:GetParameter",)),
    ("DecryptSecureStringsThroughSsm", "kms_via_ssm", ("kms:Decrypt",)),
    ("PublishOwnerAlerts", "alerts_topic", ("sns:Publish",)),  # calling/alerts.py
)


class DeployError(RuntimeError):
    """A deploy that must not go on; the message says what to fix."""


def _say(message: str) -> None:
    print(message, flush=True)


# --- 1. configuration and the stage -------------------------------------------------------------------


def validate_config(stage: str, project_dir: Path = ROOT):
    """config/<stage>.yaml parsed as the app parses it; a problem names the key."""
    from functions.core.config import ConfigError, parse

    if not STAGE_PATTERN.fullmatch(stage):
        raise DeployError(f"stage {stage!r}: lowercase letters, digits and '-', starting with a letter (<= 20)")
    relative = f"config/{stage}.yaml"
    path = project_dir / relative
    if not path.is_file():
        raise DeployError(f"{relative}: no configuration document for stage {stage} (copy config/prod.yaml)")
    try:
        document = parse(path.read_text(encoding="utf-8"), relative)
    except ConfigError as exc:
        raise DeployError(str(exc)) from None
    # API Gateway answers over IPv6 too: an IPv4-only allowlist would answer Beeline's IPv6 posts with 403.
    versions = {ipaddress.ip_network(c, strict=False).version for c in document.provider.webhook_cidrs}
    if 6 not in versions:
        raise DeployError(f"{relative}: provider.webhook_cidrs: no IPv6 range; the API is reachable over IPv6, "
                          "so add Beeline's IPv6 ranges (or ::/0 next to 0.0.0.0/0)")
    return document


def load_chalice_config(project_dir: Path = ROOT) -> dict:
    return json.loads((project_dir / ".chalice" / "config.json").read_text(encoding="utf-8"))


def check_stage(stage: str, environ: dict, chalice_config: dict) -> None:
    """The stage is one fact: anything that names another stage fails the deploy before it touches AWS."""
    problems = []
    wanted_config = f"config/{stage}.yaml"
    shell_stage = environ.get("CALLBRIDGE_STAGE")
    if shell_stage and shell_stage != stage:
        problems.append(f"CALLBRIDGE_STAGE={shell_stage} in your shell, but STAGE={stage}: unset it or make them equal")
    shell_config = environ.get("CALLBRIDGE_CONFIG")
    if shell_config and Path(shell_config).as_posix().removeprefix("./") != wanted_config:
        problems.append(f"CALLBRIDGE_CONFIG={shell_config} in your shell, but stage {stage} deploys {wanted_config}")
    entry = chalice_config.get("stages", {}).get(stage, {})
    env = entry.get("environment_variables", {})
    if env.get("CALLBRIDGE_STAGE", stage) != stage:
        problems.append(f".chalice/config.json: stages.{stage}.environment_variables.CALLBRIDGE_STAGE is "
                        f"{env['CALLBRIDGE_STAGE']!r}, not {stage!r}")
    if env.get("CALLBRIDGE_CONFIG", wanted_config) != wanted_config:
        problems.append(f".chalice/config.json: stages.{stage}.environment_variables.CALLBRIDGE_CONFIG is "
                        f"{env['CALLBRIDGE_CONFIG']!r}, not {wanted_config!r}")
    if "iam_policy_file" in entry:
        # Chalice would give it to every function without its own entry: one shared policy again.
        problems.append(f".chalice/config.json: stages.{stage}.iam_policy_file is {entry['iam_policy_file']!r}: "
                        f"remove it, each function has its own (lambda_functions.<function>.iam_policy_file)")
    for function, settings in sorted(entry.get("lambda_functions", {}).items()):
        policy = settings.get("iam_policy_file", policy_file_name(stage, function))
        if policy != policy_file_name(stage, function):
            problems.append(f".chalice/config.json: stages.{stage}.lambda_functions.{function}.iam_policy_file is "
                            f"{policy!r}, not {policy_file_name(stage, function)!r}")
    for key in ("autogen_policy",):
        if chalice_config.get(key, True) is not False or entry.get(key, False) is not False:
            problems.append(".chalice/config.json: autogen_policy must be false (it misses calls made in functions/)")
    if problems:
        raise DeployError("the stage is not one fact:\n  " + "\n  ".join(problems))


def check_shell_resources(environ: dict, stage_env: dict) -> None:
    """A resource name left in the shell (INTAKE_QUEUE=...) would be baked into the decorators at package time."""
    wrong = [f"{var}={environ[var]} in your shell, but the stack says {stage_env[var]}"
             for var in OUTPUT_ENV.values() if environ.get(var) and environ[var] != stage_env.get(var)]
    if wrong:
        raise DeployError("the stage is not one fact:\n  " + "\n  ".join(wrong))


# --- 2. the stack ---------------------------------------------------------------------------------------


def _session(endpoint_url: str | None, region: str | None):
    from infra.local.stack import _session as session

    return session(endpoint_url, region or "us-east-1")


def _stack_parameters(stage: str, document, existing: dict | None, environ: dict) -> list[dict]:
    params = [
        {"ParameterKey": "Stage", "ParameterValue": stage},
        {"ParameterKey": "RetentionDays", "ParameterValue": str(document.provider.retention_days)},
    ]
    if "ALERT_EMAIL" in environ:
        params.append({"ParameterKey": "AlertEmail", "ParameterValue": environ["ALERT_EMAIL"]})
    elif existing is not None:
        params.append({"ParameterKey": "AlertEmail", "UsePreviousValue": True})
    else:
        params.append({"ParameterKey": "AlertEmail", "ParameterValue": ""})
    return params


def _no_changes(reason: str) -> bool:
    return "didn't contain changes" in reason or "No updates are to be performed" in reason


def ensure_stack(cfn, stage: str, document, environ: dict, template_body: str | None = None) -> dict[str, str]:
    """Create the stack or update it through a change set; returns its outputs."""
    from infra.local.stack import _describe, _wait

    name = f"callbridge-{stage}"
    body = template_body or TEMPLATE.read_text(encoding="utf-8")
    stack = _wait(cfn, name)
    if stack is not None and stack["StackStatus"] in ("ROLLBACK_COMPLETE", "ROLLBACK_FAILED", "DELETE_FAILED"):
        raise DeployError(f"stack {name} is {stack['StackStatus']} (a failed first creation): "
                          f"run `make destroy STAGE={stage}`, then deploy again")
    params = _stack_parameters(stage, document, stack, environ)
    if stack is None:
        _say(f"stack {name}: creating")
        cfn.create_stack(StackName=name, TemplateBody=body, Parameters=params)
    else:
        change_set = cfn.create_change_set(StackName=name, TemplateBody=body, Parameters=params,
                                           ChangeSetName=f"callbridge-{int(time.time())}", ChangeSetType="UPDATE")
        described = _wait_change_set(cfn, change_set["Id"])
        if described["Status"] == "FAILED":
            cfn.delete_change_set(ChangeSetName=change_set["Id"])  # an empty change set left behind is a change
            if _no_changes(described.get("StatusReason", "")):
                _say(f"stack {name}: no changes")
                return _outputs(_describe(cfn, name))
            raise DeployError(f"stack {name}: change set failed: {described.get('StatusReason')}")
        for change in described.get("Changes", []):
            rc = change.get("ResourceChange", {})
            _say(f"stack {name}: {rc.get('Action')} {rc.get('LogicalResourceId')} "
                 f"(replacement: {rc.get('Replacement', 'n/a')})")
        cfn.execute_change_set(ChangeSetName=change_set["Id"])
    stack = _wait(cfn, name)
    ok = ("CREATE_COMPLETE", "UPDATE_COMPLETE")
    if stack is None or stack["StackStatus"] not in ok:
        status = stack["StackStatus"] if stack else "gone"
        raise DeployError(f"stack {name} ended in {status}: {stack and stack.get('StackStatusReason')} "
                          "(the stack's events in the CloudFormation console say which resource)")
    _say(f"stack {name}: {stack['StackStatus']}")
    return _outputs(stack)


def _wait_change_set(cfn, change_set_id: str, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        described = cfn.describe_change_set(ChangeSetName=change_set_id)
        if described["Status"] not in ("CREATE_PENDING", "CREATE_IN_PROGRESS"):
            return described
        if time.monotonic() > deadline:
            raise DeployError(f"change set still {described['Status']} after {timeout:.0f} s")
        time.sleep(2)


def _outputs(stack: dict) -> dict[str, str]:
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs") or []}
    missing = sorted(set(OUTPUT_ENV) - set(outputs))
    if missing:
        raise DeployError(f"stack {stack['StackName']} lacks the outputs {missing}")
    return outputs


def stage_environment(stage: str, outputs: dict[str, str]) -> dict[str, str]:
    env = {"CALLBRIDGE_STAGE": stage, "CALLBRIDGE_CONFIG": f"config/{stage}.yaml"}
    env.update({var: outputs[key] for key, var in OUTPUT_ENV.items()})
    return env


# --- 3. secrets -----------------------------------------------------------------------------------------


def _ask(name: str, where: str) -> str:
    if not sys.stdin.isatty():
        raise DeployError(f"{name} is not known yet: set the environment variable {name} ({where})")
    return getpass.getpass(f"{name} ({where}): ").strip()  # no echo: tokens must not land in a terminal log


def ensure_secrets(ssm, stage: str, environ: dict, ask: Callable[[str, str], str] = _ask) -> list[str]:
    """Create the missing SecureStrings; returns the names created. Values are never printed or returned."""
    prefix = f"/callbridge/{stage}/"
    existing = set()
    paginator = ssm.get_paginator("describe_parameters")
    for page in paginator.paginate(ParameterFilters=[{"Key": "Path", "Option": "OneLevel", "Values": [prefix[:-1]]}]):
        existing |= {p["Name"] for p in page["Parameters"]}
    created = []
    for name in (*GENERATED_SECRETS, *PROVIDER_SECRETS):
        path = prefix + name.lower()
        if path in existing:
            _say(f"secret {path}: present (kept)")
            continue
        if name in GENERATED_SECRETS:
            value, source = secrets.token_urlsafe(32), "generated"
        elif environ.get(name):
            value, source = environ[name], f"from ${name}"
        else:
            value, source = ask(name, PROVIDER_SECRETS[name]), "entered"
        if not value:
            raise DeployError(f"secret {name}: empty ({PROVIDER_SECRETS.get(name, '')})")
        ssm.put_parameter(Name=path, Value=value, Type="SecureString", Overwrite=False,
                          Description=f"callbridge {stage}: {name}")
        created.append(name)
        _say(f"secret {path}: created ({source})")
    return created


def company_id(environ: dict, current: dict, ask: Callable[[str, str], str] = _ask) -> str:
    """Not a secret: it goes into the functions' environment (it fills the default SalesRender URL)."""
    value = environ.get("SALESRENDER_COMPANY_ID") or current.get("SALESRENDER_COMPANY_ID")
    value = str(value or ask("SALESRENDER_COMPANY_ID", COMPANY_ID_HELP)).strip()
    if not value.isdigit():
        raise DeployError(f"SALESRENDER_COMPANY_ID: {value!r} is not a number ({COMPANY_ID_HELP})")
    return value


# --- 4. .chalice/config.json and the IAM policies -------------------------------------------------------


def _write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    path.write_text(text, encoding="utf-8")
    return True


def policy_file_name(stage: str, function: str) -> str:
    """The function's policy file in .chalice/ (its role is callbridge-<stage>-<function>, Chalice's name)."""
    return f"policy-{stage}-{function}.json"


def write_chalice_config(project_dir: Path, stage: str, env: dict[str, str]) -> bool:
    """Merge `env` into the stage's environment; the same input writes the same bytes (True if it changed)."""
    path = project_dir / ".chalice" / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["autogen_policy"] = False
    entry = data.setdefault("stages", {}).setdefault(stage, {})
    entry["api_gateway_stage"] = API_GATEWAY_STAGE
    entry.pop("iam_policy_file", None)  # the stage-wide policy every function shared before
    functions = entry.setdefault("lambda_functions", {})
    for function in FUNCTION_CALLS:
        functions.setdefault(function, {})["iam_policy_file"] = policy_file_name(stage, function)
    entry.setdefault("environment_variables", {}).update(env)
    return _write_if_changed(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def lambda_name(stage: str, function: str) -> str:
    """The Lambda function `chalice deploy` creates: callbridge-<stage> for the API, else callbridge-<stage>-<name>."""
    return f"callbridge-{stage}" if function == "api_handler" else f"callbridge-{stage}-{function}"


def _arns(stage: str, outputs: dict[str, str], account: str, region: str, partition: str,
          function: str) -> dict[str, list[str]]:
    log_group = f"arn:{partition}:logs:{region}:{account}:log-group:/aws/lambda/{lambda_name(stage, function)}"
    table = f"arn:{partition}:dynamodb:{region}:{account}:table/{outputs['StateTableName']}"
    queue = EVENT_QUEUES.get(function)
    return {
        "own_log_group": [log_group, f"{log_group}:log-stream:*"],
        "own_queue": [f"arn:{partition}:sqs:{region}:{account}:{outputs[f'{queue.capitalize()}QueueName']}"]
        if queue else [],
        "queues": [f"arn:{partition}:sqs:{region}:{account}:{outputs[k]}" for k in QUEUE_OUTPUTS],
        "table": [table, f"{table}/index/*"],
        "bucket_objects": [f"arn:{partition}:s3:::{outputs['RecordingsBucketName']}/*"],
        "ssm_parameters": [f"arn:{partition}:ssm:{region}:{account}:parameter/callbridge/{stage}/*"],
        "kms_via_ssm": [f"arn:{partition}:kms:{region}:{account}:key/*"],
        "alerts_topic": [outputs["AlertsTopicArn"]],
    }


def function_actions(function: str) -> set[str]:
    """Its code's calls, and what Lambda does with its role: logs; polling its queue; SecureString decryption."""
    actions = {*FUNCTION_CALLS[function], *LOG_CALLS}
    if function in EVENT_QUEUES:
        actions.update(POLL_CALLS)
    if "ssm:GetParameter" in actions:
        actions.add("kms:Decrypt")  # the stage's secrets are SecureStrings (functions/core/secrets.py)
    return actions


def policy_document(function: str, stage: str, outputs: dict[str, str], account: str, region: str,
                    partition: str = "aws") -> dict:
    """One function's role policy, every resource named from the stack's outputs (account/region may be '*')."""
    arns = _arns(stage, outputs, account, region, partition, function)
    actions = function_actions(function)
    statements = []
    for sid, kind, allowed in GRANTS:
        mine = sorted(actions.intersection(allowed))
        if not mine:
            continue
        statement = {"Sid": sid, "Effect": "Allow", "Action": mine, "Resource": arns[kind]}
        if kind == "kms_via_ssm":
            statement["Condition"] = {"StringLike": {"kms:ViaService": f"ssm.{region}.amazonaws.com"}}
        statements.append(statement)
    return {"Version": "2012-10-17", "Statement": statements}


def function_policies(stage: str, outputs: dict[str, str], account: str, region: str,
                      partition: str = "aws") -> dict[str, dict]:
    """Every function's policy document, by function name."""
    return {function: policy_document(function, stage, outputs, account, region, partition)
            for function in FUNCTION_CALLS}


def offline_outputs(stage: str) -> dict[str, str]:
    """The outputs a stack of this stage will have, before it exists (the bucket carries the account id)."""
    names = {f"{kind}{suffix}Name": f"callbridge-{stage}-{kind.lower()}{'-dlq' if suffix == 'Dlq' else ''}"
             for kind in (q.capitalize() for q in QUEUES) for suffix in ("Queue", "Dlq")}
    return {**names, "StateTableName": f"callbridge-{stage}-state",
            "RecordingsBucketName": f"callbridge-{stage}-recordings-*",
            "AlertsTopicArn": f"arn:aws:sns:*:*:callbridge-{stage}-alerts"}


def write_policies(project_dir: Path, stage: str, policies: dict[str, dict]) -> list[str]:
    """Writes each function's policy file; returns the functions whose file changed."""
    return [function for function, document in policies.items()
            if _write_if_changed(project_dir / ".chalice" / policy_file_name(stage, function),
                                 json.dumps(document, indent=2) + "\n")]


def read_policies(project_dir: Path, stage: str) -> dict[str, dict]:
    """The policy files the functions of this stage deploy with, by function name."""
    return {function: json.loads((project_dir / ".chalice" / policy_file_name(stage, function))
                                 .read_text(encoding="utf-8")) for function in FUNCTION_CALLS}


# --- 5. chalice package / deploy ------------------------------------------------------------------------


def chalice_environment(environ: dict, stage_env: dict[str, str]) -> dict[str, str]:
    """The environment Chalice runs in: the stage's names, never a leftover from the shell."""
    env = {k: v for k, v in environ.items() if k not in OUTPUT_ENV.values() and k != "PUBLIC_BASE_URL"}
    env.update(stage_env)
    env.setdefault("AWS_DEFAULT_REGION", "us-east-1")  # `chalice package` needs one even offline
    return env


def run_chalice(project_dir: Path, args: list[str], env: dict[str, str], timeout: float = 900) -> None:
    # sys.exit(main()): chalice.cli.main returns its exit status instead of exiting with it.
    command = [sys.executable, "-c", "import sys; from chalice.cli import main; sys.exit(main())", *args]
    # Chalice's zip cache key hashes vendor/ (functions/ with its __pycache__): a .pyc written by Chalice's own
    # import of app.py would change it between `chalice package` (whose zip gets compiled modules, see
    # compile_package) and `chalice deploy`, which uploads that cached zip only while the key is unchanged.
    env = {**env, "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(command, cwd=project_dir, env=env, capture_output=True, text=True,  # noqa: S603
                            timeout=timeout, check=False)
    if result.returncode != 0:
        raise ChaliceFailed(args[0], result.stdout + result.stderr)


class ChaliceFailed(DeployError):
    def __init__(self, command: str, output: str):
        super().__init__(f"chalice {command} failed:\n{output.strip()[-4000:]}")
        self.output = output


def expected_concurrency(document) -> int:
    """Lambda's MaximumConcurrency is 2..1000: more dialers than channels only re-send, never dial more."""
    return max(2, document.provider.channel_limit)


def _polled_queues(policy: dict) -> set[str]:
    """Names of the queues a policy lets an event-source mapping poll."""
    return {arn.rsplit(":", 1)[-1] for s in policy["Statement"] if "sqs:ReceiveMessage" in s["Action"]
            for arn in s["Resource"]}


def check_package(sam: dict, stage: str, variables: dict[str, str], queues: set[str], policies: dict[str, dict],
                  concurrency: int, callbacks_queue: str) -> list[str]:
    """Problems in a `chalice package` template: anything wired to another stage, or a function without its own
    role holding exactly its own policy (`policies`: function name -> the document of its policy file)."""
    from chalice.utils import to_cfn_resource_name

    problems = []
    resources = sam["Resources"]
    functions = {k: r["Properties"] for k, r in resources.items() if r["Type"] == "AWS::Serverless::Function"}
    known = {"APIHandler" if f == "api_handler" else to_cfn_resource_name(f): f for f in policies}
    role_users: dict[str, list[str]] = {}
    for name, props in functions.items():
        found = props.get("Environment", {}).get("Variables", {})
        for var, value in variables.items():
            if found.get(var) != value:
                problems.append(f"{name}: {var}={found.get(var)!r}, expected {value!r}")
        polled = set()
        for event_name, event in props.get("Events", {}).items():
            if event["Type"] != "SQS":
                continue
            queue = event["Properties"]["Queue"]
            queue_name = (queue.get("Fn::Sub", "") if isinstance(queue, dict) else queue).rsplit(":", 1)[-1]
            polled.add(queue_name)
            if queue_name not in queues:
                problems.append(f"{name}.{event_name}: reads queue {queue_name}, not one of stage {stage}'s")
            if event["Properties"].get("BatchSize") != 1:
                problems.append(f"{name}.{event_name}: batch size {event['Properties'].get('BatchSize')}, expected 1")
            if queue_name == callbacks_queue:
                got = event["Properties"].get("ScalingConfig", {}).get("MaximumConcurrency")
                if got != concurrency:
                    problems.append(f"{name}.{event_name}: MaximumConcurrency {got}, expected {concurrency}")
        function = known.get(name)
        if function is None:
            problems.append(f"{name}: a function infra/deploy.py has no policy for (add it to FUNCTION_CALLS)")
            continue
        role = props.get("Role")
        if not (isinstance(role, dict) and list(role) == ["Fn::GetAtt"] and role["Fn::GetAtt"][1] == "Arn"
                and resources.get(role["Fn::GetAtt"][0], {}).get("Type") == "AWS::IAM::Role"):
            problems.append(f"{name}: its role {role!r} is not a role of this template")
            continue
        role_key = role["Fn::GetAtt"][0]
        role_users.setdefault(role_key, []).append(name)
        documents = [p["PolicyDocument"] for p in resources[role_key]["Properties"].get("Policies", [])]
        if documents != [policies[function]]:
            problems.append(f"{name}: its role {role_key} does not hold exactly "
                            f".chalice/{policy_file_name(stage, function)}")
        if polled != _polled_queues(policies[function]):
            problems.append(f"{name}: polls {sorted(polled)}, its policy lets it poll "
                            f"{sorted(_polled_queues(policies[function]))}")
    for role_key, users in sorted(role_users.items()):
        if len(users) > 1:
            problems.append(f"{role_key}: the role of {len(users)} functions ({', '.join(sorted(users))}), "
                            f"each needs its own")
    for key in sorted(k for k, r in resources.items() if r["Type"] == "AWS::IAM::Role" and k not in role_users):
        problems.append(f"{key}: a role no checked function uses")
    for key in sorted(set(known) - set(functions)):
        problems.append(f"{key}: infra/deploy.py has a policy for {known[key]}, the package has no such function")
    return problems


def check_stage_package(sam: dict, stage: str, stage_env: dict[str, str], policies: dict[str, dict],
                        document) -> None:
    queues = {stage_env[f"{q.upper()}_QUEUE"] for q in QUEUES}
    problems = check_package(sam, stage, stage_env, queues, policies, expected_concurrency(document),
                             stage_env["CALLBACKS_QUEUE"])
    if problems:
        raise DeployError(f"chalice package is not wired to stage {stage}:\n  " + "\n  ".join(problems))


def compile_package(zip_path: Path, runtime: str) -> int:
    """Prune, strip and byte-compile a Lambda zip in place (infra/lambda_package.py: the reviewed prune list,
    sourceless third-party byte-code, our own code as sources with .pyc); returns how many .pyc files it holds.
    """
    from infra import lambda_package

    try:
        report = lambda_package.compile_package(zip_path, runtime)
    except lambda_package.PackageError as exc:
        raise DeployError(str(exc)) from None
    if report.not_stripped:
        print(f"package: {report.not_stripped}", file=sys.stderr)
    return report.compiled


def package(project_dir: Path, stage: str, env: dict[str, str], out_dir: Path) -> dict:
    # .chalice/deployments is the project's one zip cache: two packagings at once (two shells, parallel tests)
    # would clear and rename in it under each other, so one runs at a time.
    with (project_dir / ".chalice" / ".package.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _package(project_dir, stage, env, out_dir)


def _package(project_dir: Path, stage: str, env: dict[str, str], out_dir: Path) -> dict:
    shutil.rmtree(project_dir / ".chalice" / "deployments", ignore_errors=True)  # Chalice caches stale zips
    if out_dir.exists():
        shutil.rmtree(out_dir)
    run_chalice(project_dir, ["package", "--stage", stage, str(out_dir)], env)
    sam = json.loads((out_dir / "sam.json").read_text(encoding="utf-8"))
    runtimes = {r["Properties"].get("Runtime") for r in sam["Resources"].values()
                if r["Type"] == "AWS::Serverless::Function"}
    if len(runtimes) != 1:
        raise DeployError(f"chalice package: the functions have runtimes {sorted(map(str, runtimes))}, expected one")
    [runtime] = runtimes
    # The deployment.zip of the template and Chalice's cached zip, which `chalice deploy` uploads, alike.
    for zip_path in [out_dir / "deployment.zip", *sorted((project_dir / ".chalice" / "deployments").glob("*.zip"))]:
        compile_package(zip_path, runtime)
    return sam


def deployed_api_url(project_dir: Path, stage: str) -> str | None:
    path = project_dir / ".chalice" / "deployed" / f"{stage}.json"
    if not path.exists():
        return None
    for resource in json.loads(path.read_text(encoding="utf-8")).get("resources", []):
        if resource.get("resource_type") == "rest_api":
            return resource["rest_api_url"].rstrip("/")
    return None


def deployed_function_names(project_dir: Path, stage: str) -> list[str]:
    path = project_dir / ".chalice" / "deployed" / f"{stage}.json"
    if not path.exists():
        return []
    resources = json.loads(path.read_text(encoding="utf-8")).get("resources", [])
    return sorted(r["lambda_arn"].rsplit(":", 1)[-1] for r in resources if r.get("resource_type") == "lambda_function")


def sqs_handlers(project_dir: Path) -> list[str]:
    """Names of app.py's SQS handlers (their Lambda functions are callbridge-<stage>-<name>)."""
    text = (project_dir / "app.py").read_text(encoding="utf-8")
    return re.findall(r"@app\.on_sqs_message\((?:[^()]|\([^()]*\))*\)\s*\ndef (\w+)", text)


def remove_orphan_mappings(lambda_client, project_dir: Path, stage: str) -> int:
    """Delete the stage's SQS event-source mappings that Chalice has no record of.

    Chalice records a mapping only when a whole deploy succeeds; after one that failed part-way (an API
    Gateway error, a timeout) the next deploy creates the mappings again, and the old ones keep polling:
    two pollers per queue, and MaximumConcurrency no longer bounds the dialers. Returns how many it deleted.
    """
    path = project_dir / ".chalice" / "deployed" / f"{stage}.json"
    known = set()
    if path.exists():
        known = {r["event_uuid"] for r in json.loads(path.read_text(encoding="utf-8")).get("resources", [])
                 if "event_uuid" in r}
    functions = {f"callbridge-{stage}-{handler}" for handler in sqs_handlers(project_dir)}
    deleted = 0
    # Listed whole and matched on the function's exact name (moto ignores a FunctionName filter given by name).
    for page in lambda_client.get_paginator("list_event_source_mappings").paginate():
        for mapping in page["EventSourceMappings"]:
            function = mapping.get("FunctionArn", "").split(":function:")[-1].split(":")[0]
            if function in functions and mapping["UUID"] not in known:
                lambda_client.delete_event_source_mapping(UUID=mapping["UUID"])
                deleted += 1
    if deleted:
        _say(f"event-source mappings left by an unfinished deploy: {deleted} deleted (Chalice makes them again)")
    return deleted


# --- 7. what Chalice cannot express, the doctor, the URLs -----------------------------------------------


def apply_log_retention(logs, function_names: list[str], days: int = LOG_RETENTION_DAYS) -> None:
    """Lambda creates log groups that keep everything forever; these hold personal data (masked, still)."""
    for function in function_names:
        group = f"/aws/lambda/{function}"
        found = logs.describe_log_groups(logGroupNamePrefix=group).get("logGroups", [])
        current = next((g for g in found if g["logGroupName"] == group), None)
        if current is None:
            logs.create_log_group(logGroupName=group)
        if current is None or current.get("retentionInDays") != days:
            logs.put_retention_policy(logGroupName=group, retentionInDays=days)


def run_doctor(project_dir: Path, env: dict[str, str]) -> None:
    if not (project_dir / "functions" / "insight" / "doctor.py").exists():
        _say("doctor: functions/insight/doctor.py does not exist yet: skipped")
        return
    result = subprocess.run([sys.executable, "-m", "functions.insight.doctor"], cwd=project_dir,
                            env=env, check=False, timeout=300)
    if result.returncode != 0:
        raise DeployError("the doctor found problems (above): the stage is deployed but not healthy")


def paste_instructions(stage: str, base_url: str, routes: list[str]) -> list[str]:
    """What to paste where. Secrets are named by their SSM path, never shown."""
    read = "aws ssm get-parameter --with-decryption --query Parameter.Value --output text --name"
    lines = [f"API: {base_url}",
             f"Tilda (Site Settings -> Forms -> Webhook): URL {base_url}/webhooks/tilda, API METHOD 'in header', "
             f"header X-Api-Key, value: `{read} /callbridge/{stage}/tilda_api_key`"]
    for route in sorted(routes):
        if route.startswith("/webhooks/salesrender"):
            path = route.replace("{secret}", "<salesrender_webhook_secret>")
            lines.append(f"SalesRender trigger webhook: {base_url}{path} "
                         f"(secret: `{read} /callbridge/{stage}/salesrender_webhook_secret`)")
    if any(r.startswith("/salesrender-plugin/") for r in routes):
        # SalesRender asks for the plugin's base URL once and finds info/registration/special/call under it.
        lines.append(f"SalesRender PBX plugin URL: {base_url}/salesrender-plugin/")
    if "/dashboard" in routes:
        lines.append(f"Dashboard: {base_url}/dashboard?token=<api token: "
                     f"`{read} /callbridge/{stage}/callbridge_api_token`>")
    lines.append("Beeline: nothing to do; the subscription keeper subscribes to the call events within 5 minutes")
    return lines


def app_routes(project_dir: Path) -> list[str]:
    """The routes of app.py, read from its source (importing it here would bake this process's env in)."""
    text = (project_dir / "app.py").read_text(encoding="utf-8")
    return re.findall(r"@app\.route\(\s*[\"']([^\"']+)[\"']", text)


# --- the commands ---------------------------------------------------------------------------------------


def deploy(stage: str, project_dir: Path = ROOT, environ: dict | None = None, endpoint_url: str | None = None,
           region: str | None = None, ask: Callable[[str, str], str] = _ask,
           package_dir: Path | None = None) -> dict[str, str]:
    """The whole deploy; returns the stage's environment. Raises DeployError (or ChaliceFailed) on failure.
    `package_dir` keeps the checked `chalice package` output there (the rehearsal lints it)."""
    environ = dict(os.environ if environ is None else environ)
    endpoint_url = endpoint_url or environ.get("AWS_ENDPOINT_URL")
    region = region or environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    document = validate_config(stage, project_dir)
    current = load_chalice_config(project_dir)
    check_stage(stage, environ, current)
    _say(f"config/{stage}.yaml: valid")

    session = _session(endpoint_url, region)
    outputs = ensure_stack(session.client("cloudformation", endpoint_url=endpoint_url), stage, document, environ)
    stage_env = stage_environment(stage, outputs)
    check_shell_resources(environ, stage_env)
    ensure_secrets(session.client("ssm", endpoint_url=endpoint_url), stage, environ, ask)
    existing_env = current.get("stages", {}).get(stage, {}).get("environment_variables", {})
    stage_env["SALESRENDER_COMPANY_ID"] = company_id(environ, existing_env, ask)
    if existing_env.get("PUBLIC_BASE_URL"):
        stage_env["PUBLIC_BASE_URL"] = existing_env["PUBLIC_BASE_URL"]

    account = session.client("sts", endpoint_url=endpoint_url).get_caller_identity()["Account"]
    from infra.local.stack import _partition

    policies = function_policies(stage, outputs, account, region, _partition(region))
    _say(f".chalice/config.json: {'written' if write_chalice_config(project_dir, stage, stage_env) else 'unchanged'}")
    changed = write_policies(project_dir, stage, policies)
    _say(f".chalice/policy-{stage}-<function>.json ({len(policies)} functions): "
         f"{'written for ' + ', '.join(changed) if changed else 'unchanged'}")

    env = chalice_environment(environ, stage_env)
    env["AWS_DEFAULT_REGION"] = region
    with tempfile.TemporaryDirectory(prefix="callbridge-package-") as scratch:
        sam = package(project_dir, stage, env, package_dir or Path(scratch) / "out")
    check_stage_package(sam, stage, stage_env, policies, document)
    _say("chalice package: every function uses this stage's queues and names, and its own role and policy")

    remove_orphan_mappings(session.client("lambda", endpoint_url=endpoint_url), project_dir, stage)
    _say(f"chalice deploy --stage {stage}")
    run_chalice(project_dir, ["deploy", "--stage", stage], env)
    base_url = deployed_api_url(project_dir, stage)
    if base_url and stage_env.get("PUBLIC_BASE_URL") != base_url:
        # The API's URL exists only after its first deploy: tell the functions and deploy once more.
        stage_env["PUBLIC_BASE_URL"] = base_url
        write_chalice_config(project_dir, stage, stage_env)
        _say(f"PUBLIC_BASE_URL={base_url}: written, deploying again so the functions know it")
        run_chalice(project_dir, ["deploy", "--stage", stage], chalice_environment(environ, stage_env))
    apply_log_retention(session.client("logs", endpoint_url=endpoint_url), deployed_function_names(project_dir, stage))
    run_doctor(project_dir, chalice_environment(environ, stage_env))
    _say("")
    for line in paste_instructions(stage, stage_env.get("PUBLIC_BASE_URL", "<API URL>"), app_routes(project_dir)):
        _say(line)
    return stage_env


def destroy(stage: str, project_dir: Path = ROOT, environ: dict | None = None, endpoint_url: str | None = None,
            region: str | None = None, delete_bucket: bool = False, confirmed: bool = False) -> None:
    """Remove the stage: the Chalice app, the stack, the state table, the secrets; the bucket only if asked."""
    environ = dict(os.environ if environ is None else environ)
    endpoint_url = endpoint_url or environ.get("AWS_ENDPOINT_URL")
    region = region or environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    check_stage(stage, environ, load_chalice_config(project_dir))
    if not confirmed:
        if not sys.stdin.isatty():
            raise DeployError("destroy deletes the stage's data: pass --yes (make destroy ... YES=1)")
        if input(f"type the stage name ({stage}) to delete it: ").strip() != stage:
            raise DeployError("not confirmed: nothing deleted")
    from infra.local.stack import _describe, _wait

    session = _session(endpoint_url, region)
    env = chalice_environment(environ, {"CALLBRIDGE_STAGE": stage})
    env["AWS_DEFAULT_REGION"] = region
    if (project_dir / ".chalice" / "deployed" / f"{stage}.json").exists():
        run_chalice(project_dir, ["delete", "--stage", stage], env)
        _say(f"chalice app of stage {stage}: deleted")
    cfn = session.client("cloudformation", endpoint_url=endpoint_url)
    name = f"callbridge-{stage}"
    stack = _describe(cfn, name)
    outputs = {o["OutputKey"]: o["OutputValue"] for o in (stack or {}).get("Outputs") or []}
    if stack is not None:
        cfn.delete_stack(StackName=name)
        _wait(cfn, name)
        _say(f"stack {name}: deleted")
    # Table and bucket have DeletionPolicy Retain (a stack replacement must not lose them): deleted here.
    dynamodb = session.client("dynamodb", endpoint_url=endpoint_url)
    table = outputs.get("StateTableName", f"callbridge-{stage}-state")
    try:
        dynamodb.delete_table(TableName=table)
        _say(f"table {table}: deleted")
    except dynamodb.exceptions.ResourceNotFoundException:
        pass
    bucket = outputs.get("RecordingsBucketName")
    if delete_bucket and bucket:
        s3 = session.resource("s3", endpoint_url=endpoint_url)
        s3.Bucket(bucket).objects.all().delete()
        s3.Bucket(bucket).delete()
        _say(f"bucket {bucket}: emptied and deleted")
    elif bucket:
        _say(f"bucket {bucket}: kept (recordings); DELETE_BUCKET=1 deletes it")
    ssm = session.client("ssm", endpoint_url=endpoint_url)
    for secret in (*GENERATED_SECRETS, *PROVIDER_SECRETS, "PUBLIC_BASE_URL"):
        try:
            ssm.delete_parameter(Name=f"/callbridge/{stage}/{secret.lower()}")
        except ssm.exceptions.ParameterNotFound:
            pass
    _say(f"secrets /callbridge/{stage}/*: deleted")
    path = project_dir / ".chalice" / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    env_vars = data.get("stages", {}).get(stage, {}).get("environment_variables", {})
    for var in (*OUTPUT_ENV.values(), "PUBLIC_BASE_URL"):
        env_vars.pop(var, None)
    _write_if_changed(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def package_command(stage: str, out_dir: Path, project_dir: Path = ROOT, environ: dict | None = None) -> dict:
    """`make package`: the stage's zip and template, checked as a deploy checks them (no AWS needed).

    Before the first deploy the stage's environment has no stack outputs yet: the names are then the ones
    the template will give (the bucket's account id unknown, so only what is known is checked)."""
    environ = dict(os.environ if environ is None else environ)
    document = validate_config(stage, project_dir)
    current = load_chalice_config(project_dir)
    check_stage(stage, environ, current)
    configured = current.get("stages", {}).get(stage, {}).get("environment_variables", {})
    stage_env = {**stage_environment(stage, offline_outputs(stage)), **configured}
    check_shell_resources(environ, stage_env)
    # A stage never deployed gets its entries and offline policies; a deployed one's files name its account.
    write_chalice_config(project_dir, stage, {})
    for function, policy in function_policies(stage, offline_outputs(stage), "*", "*").items():
        if not (project_dir / ".chalice" / policy_file_name(stage, function)).exists():
            write_policies(project_dir, stage, {function: policy})
    policies = read_policies(project_dir, stage)
    known = {k: v for k, v in stage_env.items() if "*" not in v and (k in configured or k.endswith("_QUEUE"))}
    sam = package(project_dir, stage, chalice_environment(environ, known), out_dir)
    variables = {k: v for k, v in known.items() if k in configured}
    queues = {stage_env[f"{q.upper()}_QUEUE"] for q in QUEUES}
    problems = check_package(sam, stage, variables, queues, policies, expected_concurrency(document),
                             stage_env["CALLBACKS_QUEUE"])
    if problems:
        raise DeployError(f"chalice package is not wired to stage {stage}:\n  " + "\n  ".join(problems))
    _say(f"{out_dir}: deployment.zip and sam.json for stage {stage}, checked")
    return sam


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("deploy", "destroy", "package"):
        p = sub.add_parser(name)
        p.add_argument("--stage", required=True)
        if name == "destroy":
            p.add_argument("--delete-bucket", action="store_true", help="also empty and delete the recordings bucket")
            p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        if name == "package":
            p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "deploy":
            deploy(args.stage)
        elif args.command == "destroy":
            destroy(args.stage, delete_bucket=args.delete_bucket, confirmed=args.yes)
        else:
            package_command(args.stage, args.out)
    except DeployError as exc:
        print(f"{args.command} {args.stage}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
