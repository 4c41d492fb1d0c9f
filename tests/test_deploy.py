"""The one-command deploy (infra/deploy.py), rehearsed against a moto server, and the settings it deploys.

The rehearsal runs the same `deploy()` a user runs with `make deploy STAGE=prod`, in a temporary copy of
the project (the repository's .chalice/ is never written), against a ThreadedMotoServer on a free port.
moto's API Gateway refuses Chalice's swagger (ImportRestApi), so `chalice deploy` fails there: that failure
is expected and everything created before it is asserted, then a second run is shown to change nothing.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import yaml

from functions.core.resources import QUEUES

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from infra import deploy

pytestmark = pytest.mark.filterwarnings("ignore:Tried to parse AWS:UserWarning")
STAGE = "prod"
PROVIDED = {"BEELINE_API_TOKEN": "beeline-token-from-portal-0001", "SALESRENDER_API_TOKEN": "sr-token-0002"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_url():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def copy_project(target: Path) -> Path:
    """A project directory whose .chalice/ is a copy: the deploy writes there, never into the repository."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("app.py", "requirements.txt"):
        shutil.copy2(ROOT / name, target / name)
    shutil.copytree(ROOT / ".chalice", target / ".chalice",
                    ignore=shutil.ignore_patterns("deployments", "deployed"))
    for name in ("functions", "config"):
        (target / name).symlink_to(ROOT / name, target_is_directory=True)
    (target / "vendor").mkdir()
    for name in ("functions", "config"):  # as in the repository: Chalice ships vendor/'s contents
        (target / "vendor" / name).symlink_to(Path("..") / name, target_is_directory=True)
    return target


def fake_aws(moto_url: str) -> dict[str, str]:
    import os

    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR", "PIP_INDEX_URL",
                                                         "PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_CACHE_DIR")}
    return {**keep, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_url}


def client(moto_url: str, service: str):
    return boto3.client(service, endpoint_url=moto_url, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def never_ask(name, where):
    raise AssertionError(f"the deploy asked for {name} although the environment has it")


def state(moto_url: str, project: Path) -> dict:
    """Everything a deploy creates or writes, to compare two runs."""
    cfn, ssm, lam = (client(moto_url, s) for s in ("cloudformation", "ssm", "lambda"))
    (stack,) = cfn.describe_stacks(StackName=f"callbridge-{STAGE}")["Stacks"]
    functions = sorted(
        (f["FunctionName"], f["Timeout"], json.dumps(f["Environment"]["Variables"], sort_keys=True), f["Role"])
        for f in lam.list_functions()["Functions"]
    )
    # Without UUIDs: Chalice records a mapping's UUID only after a deploy that succeeded, which moto's API
    # Gateway prevents, so its second run re-creates them; the count shows no duplicate is left behind.
    mappings = sorted((m["EventSourceArn"], m["BatchSize"], json.dumps(m.get("ScalingConfig"), sort_keys=True))
                      for m in lam.list_event_source_mappings()["EventSourceMappings"])
    return {
        "stack": (stack["StackStatus"], stack.get("LastUpdatedTime")),
        "change_sets": cfn.list_change_sets(StackName=f"callbridge-{STAGE}")["Summaries"],
        "secrets": sorted((p["Name"], p["Version"]) for p in ssm.describe_parameters()["Parameters"]),
        "config": (project / ".chalice" / "config.json").read_bytes(),
        "policies": {p.name: p.read_bytes() for p in sorted((project / ".chalice").glob(f"policy-{STAGE}*.json"))},
        "functions": functions,
        "mappings": mappings,
    }


@pytest.fixture(scope="module")
def rehearsal(moto_url, tmp_path_factory):
    """Two deploys in a row; the first one's output and state, and the second one's."""
    project = copy_project(tmp_path_factory.mktemp("project"))
    environ = {**fake_aws(moto_url), **PROVIDED, "SALESRENDER_COMPANY_ID": "4242"}
    package_dir = tmp_path_factory.mktemp("package") / "out"
    repo_config = (ROOT / ".chalice" / "config.json").read_bytes()

    def once():
        import contextlib
        import io

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            try:
                deploy.deploy(STAGE, project_dir=project, environ=environ, ask=never_ask, package_dir=package_dir)
            except deploy.ChaliceFailed as exc:
                return buffer.getvalue(), exc
        return buffer.getvalue(), None

    first_out, first_error = once()
    first = state(moto_url, project)
    sam = json.loads((package_dir / "sam.json").read_text(encoding="utf-8"))
    second_out, second_error = once()
    second = state(moto_url, project)
    assert (ROOT / ".chalice" / "config.json").read_bytes() == repo_config  # the repository's file untouched
    return {"project": project, "environ": environ, "sam": sam, "package_dir": package_dir,
            "first": (first_out, first_error, first), "second": (second_out, second_error, second)}


# --- the rehearsal ------------------------------------------------------------------------------------


def test_rehearsal_chalice_deploy_stops_only_at_api_gateway(rehearsal):
    for out, error, _ in (rehearsal["first"], rehearsal["second"]):
        assert error is not None, "moto's API Gateway accepted Chalice's swagger: assert the URL steps instead"
        assert "ImportRestApi" in error.output or "import_rest_api" in error.output.lower(), error.output[-2000:]
        assert "chalice package: every function uses this stage's queues" in out


def test_rehearsal_creates_the_stack_from_the_template(rehearsal, moto_url):
    out, _, first = rehearsal["first"]
    assert first["stack"][0] == "CREATE_COMPLETE"
    assert "stack callbridge-prod: creating" in out
    queues = client(moto_url, "sqs").list_queues(QueueNamePrefix="callbridge-prod-")["QueueUrls"]
    assert sorted(q.rsplit("/", 1)[-1] for q in queues) == sorted(
        f"callbridge-prod-{k}{s}" for k in QUEUES for s in ("", "-dlq"))
    assert client(moto_url, "dynamodb").describe_table(TableName="callbridge-prod-state")["Table"]


def test_rehearsal_creates_every_secret_without_printing_one(rehearsal, moto_url):
    out, _, first = rehearsal["first"]
    ssm = client(moto_url, "ssm")
    names = {f"/callbridge/prod/{n.lower()}" for n in (*deploy.GENERATED_SECRETS, *deploy.PROVIDER_SECRETS)}
    assert {n for n, _ in first["secrets"]} >= names
    values = {}
    for name in names:
        parameter = ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]
        assert parameter["Type"] == "SecureString"
        values[name] = parameter["Value"]
    for secret, value in PROVIDED.items():
        assert values[f"/callbridge/prod/{secret.lower()}"] == value
    generated = [values[f"/callbridge/prod/{n.lower()}"] for n in deploy.GENERATED_SECRETS]
    assert len(set(generated)) == len(generated) and all(len(v) >= 40 for v in generated)
    second_out = rehearsal["second"][0]
    for value in values.values():
        assert value not in out and value not in second_out
        assert value not in str(rehearsal["first"][1]) and value not in (rehearsal["project"] / ".chalice" /
                                                                         "config.json").read_text()


def test_rehearsal_writes_the_stage_environment_and_policy_from_the_outputs(rehearsal):
    project = rehearsal["project"]
    stage = json.loads((project / ".chalice" / "config.json").read_text())["stages"]["prod"]
    env = stage["environment_variables"]
    assert env["CALLBRIDGE_STAGE"] == "prod" and env["CALLBRIDGE_CONFIG"] == "config/prod.yaml"
    assert env["INTAKE_QUEUE"] == "callbridge-prod-intake" and env["CALLBACKS_DLQ"] == "callbridge-prod-callbacks-dlq"
    assert env["RECORDINGS_BUCKET"] == "callbridge-prod-recordings-123456789012"
    assert env["ALERTS_TOPIC_ARN"] == "arn:aws:sns:us-east-1:123456789012:callbridge-prod-alerts"
    assert env["SALESRENDER_COMPANY_ID"] == "4242"
    assert "iam_policy_file" not in stage
    assert {f: s["iam_policy_file"] for f, s in stage["lambda_functions"].items()} == \
        {f: f"policy-prod-{f}.json" for f in deploy.FUNCTION_CALLS}
    for function in deploy.FUNCTION_CALLS:
        policy = json.loads((project / ".chalice" / f"policy-prod-{function}.json").read_text())
        resources = {r for s in policy["Statement"] for r in s["Resource"]}
        assert "arn:aws:dynamodb:us-east-1:123456789012:table/callbridge-prod-state" in resources
        assert not any("dev" in r for r in resources)
    recorder = json.loads((project / ".chalice" / "policy-prod-recording_worker.json").read_text())
    assert {"arn:aws:sqs:us-east-1:123456789012:callbridge-prod-recordings",
            "arn:aws:s3:::callbridge-prod-recordings-123456789012/*"} <= {r for s in recorder["Statement"]
                                                                          for r in s["Resource"]}


def test_rehearsal_package_is_wired_to_the_stage_and_passes_cfn_lint(rehearsal):
    sam = rehearsal["sam"]
    functions = {k: r["Properties"] for k, r in sam["Resources"].items() if r["Type"] == "AWS::Serverless::Function"}
    assert {"IntakeWorker", "CallbackWorker", "RecordingWorker", "SubscriptionKeeper", "CallReconciler",
            "APIHandler"} <= set(functions)
    for props in functions.values():
        assert props["Environment"]["Variables"]["STATE_TABLE"] == "callbridge-prod-state"
    (event,) = functions["CallbackWorker"]["Events"].values()
    assert event["Properties"]["Queue"]["Fn::Sub"].endswith(":callbridge-prod-callbacks")
    assert event["Properties"]["ScalingConfig"] == {"MaximumConcurrency": 5}  # config/prod.yaml channel_limit
    assert functions["SubscriptionKeeper"]["Timeout"] == 180 and functions["CallReconciler"]["Timeout"] == 120
    # Each function its own role, holding its own policy file (Chalice names the role <Function>Role).
    roles = {name: props["Role"]["Fn::GetAtt"][0] for name, props in functions.items()}
    assert len(set(roles.values())) == len(roles) == len(deploy.FUNCTION_CALLS)
    policy_dir = rehearsal["project"] / ".chalice"
    for function in deploy.FUNCTION_CALLS:
        key = "APIHandler" if function == "api_handler" else function.title().replace("_", "")
        (held,) = sam["Resources"][roles[key]]["Properties"]["Policies"]
        assert held["PolicyDocument"] == json.loads((policy_dir / f"policy-prod-{function}.json").read_text())
    result = subprocess.run([str(Path(sys.executable).parent / "cfn-lint"), "--format", "parseable",
                             str(rehearsal["package_dir"] / "sam.json")], capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stdout.splitlines() if ":E" in line]  # SAM's own output has warnings
    assert errors == [], result.stdout


def test_rehearsal_chalice_deploy_created_the_functions_of_this_stage(rehearsal, moto_url):
    _, _, first = rehearsal["first"]
    names = {name for name, *_ in first["functions"]}
    assert {"callbridge-prod-intake_worker", "callbridge-prod-callback_worker", "callbridge-prod-recording_worker",
            "callbridge-prod-subscription_keeper", "callbridge-prod-call_reconciler"} <= names
    for name, _, variables, _ in first["functions"]:
        assert json.loads(variables)["CALLBRIDGE_STAGE"] == "prod", name
    sources = sorted(arn.rsplit(":", 1)[-1] for arn, _, _ in first["mappings"])
    assert sources == sorted(f"callbridge-prod-{k}" for k in QUEUES)
    assert {size for _, size, _ in first["mappings"]} == {1}


def test_rehearsal_second_run_changes_nothing(rehearsal):
    _, _, first = rehearsal["first"]
    out, _, second = rehearsal["second"]
    assert second == first
    assert "stack callbridge-prod: no changes" in out
    assert ".chalice/config.json: unchanged" in out
    assert ".chalice/policy-prod-<function>.json (9 functions): unchanged" in out
    assert "created" not in out.replace("CREATE_COMPLETE", "")


# --- the stage is one fact ----------------------------------------------------------------------------


def chalice_config() -> dict:
    return json.loads((ROOT / ".chalice" / "config.json").read_text(encoding="utf-8"))


def test_a_shell_stage_other_than_the_deployed_one_fails_the_deploy():
    with pytest.raises(deploy.DeployError, match="CALLBRIDGE_STAGE=dev in your shell, but STAGE=prod"):
        deploy.check_stage("prod", {"CALLBRIDGE_STAGE": "dev"}, chalice_config())
    with pytest.raises(deploy.DeployError, match=r"CALLBRIDGE_CONFIG=config/local\.yaml"):
        deploy.check_stage("prod", {"CALLBRIDGE_CONFIG": "config/local.yaml"}, chalice_config())
    deploy.check_stage("prod", {"CALLBRIDGE_STAGE": "prod"}, chalice_config())


def test_a_chalice_stage_naming_another_stage_fails_the_deploy():
    config = chalice_config()
    config["stages"]["prod"]["environment_variables"]["CALLBRIDGE_STAGE"] = "dev"
    functions = config["stages"]["prod"]["lambda_functions"]
    functions["callback_worker"]["iam_policy_file"] = "policy-dev-callback_worker.json"
    config["stages"]["prod"]["iam_policy_file"] = "policy-prod.json"
    with pytest.raises(deploy.DeployError) as failed:
        deploy.check_stage("prod", {}, config)
    assert "CALLBRIDGE_STAGE is 'dev', not 'prod'" in str(failed.value)
    assert "lambda_functions.callback_worker.iam_policy_file is 'policy-dev-callback_worker.json'" in str(failed.value)
    assert "stages.prod.iam_policy_file is 'policy-prod.json': remove it" in str(failed.value)


def test_a_resource_name_left_in_the_shell_fails_the_deploy():
    env = deploy.stage_environment("prod", {k: f"x-{k}" for k in deploy.OUTPUT_ENV})
    with pytest.raises(deploy.DeployError, match="INTAKE_QUEUE=callbridge-dev-intake in your shell"):
        deploy.check_shell_resources({"INTAKE_QUEUE": "callbridge-dev-intake"}, env)


def test_every_stage_has_its_own_policy_files_or_none():
    for name, stage in chalice_config()["stages"].items():
        assert "iam_policy_file" not in stage, name
        for function, settings in stage.get("lambda_functions", {}).items():
            assert settings["iam_policy_file"] == f"policy-{name}-{function}.json", (name, function)
    assert chalice_config()["autogen_policy"] is False


def test_package_check_names_a_function_wired_to_another_stage():
    policy = deploy.policy_document("callback_worker", "prod", deploy.offline_outputs("prod"), "*", "*")
    sam = {"Resources": {"CallbackWorker": {"Type": "AWS::Serverless::Function", "Properties": {
        "Environment": {"Variables": {"CALLBRIDGE_STAGE": "dev"}},
        "Role": {"Fn::GetAtt": ["CallbackWorkerRole", "Arn"]},
        "Events": {"E": {"Type": "SQS", "Properties": {"Queue": {"Fn::Sub": "arn:...:callbridge-dev-callbacks"},
                                                       "BatchSize": 1}}}}},
        "CallbackWorkerRole": {"Type": "AWS::IAM::Role", "Properties": {"Policies": [{"PolicyDocument": policy}]}}}}
    problems = deploy.check_package(sam, "prod", {"CALLBRIDGE_STAGE": "prod"}, {"callbridge-prod-callbacks"},
                                    {"callback_worker": policy}, 5, "callbridge-prod-callbacks")
    assert problems == ["CallbackWorker: CALLBRIDGE_STAGE='dev', expected 'prod'",
                        "CallbackWorker.E: reads queue callbridge-dev-callbacks, not one of stage prod's",
                        "CallbackWorker: polls ['callbridge-dev-callbacks'], its policy lets it poll "
                        "['callbridge-prod-callbacks']"]


# --- the configuration document -----------------------------------------------------------------------


def project_with_config(tmp_path: Path, text: str) -> Path:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "prod.yaml").write_text(text, encoding="utf-8")
    return tmp_path


def test_deploy_refuses_an_invalid_configuration_naming_the_key(tmp_path):
    document = yaml.safe_load((ROOT / "config" / "prod.yaml").read_text(encoding="utf-8"))
    document["offers"][0]["callback_delay_seconds"] = 5000
    project = project_with_config(tmp_path, yaml.safe_dump(document))
    with pytest.raises(deploy.DeployError, match=r"offers\.0\.callback_delay_seconds"):
        deploy.deploy("prod", project_dir=project, environ={})  # fails before any AWS call: none configured


def test_deploy_refuses_an_ipv4_only_webhook_allowlist(tmp_path):
    document = yaml.safe_load((ROOT / "config" / "prod.yaml").read_text(encoding="utf-8"))
    document["provider"]["webhook_cidrs"] = ["0.0.0.0/0"]
    project = project_with_config(tmp_path, yaml.safe_dump(document))
    with pytest.raises(deploy.DeployError, match=r"provider\.webhook_cidrs: no IPv6 range"):
        deploy.validate_config("prod", project)


@pytest.mark.parametrize("stage", ["dev", "prod"])
def test_shipped_configurations_are_valid_for_a_deploy(stage):
    deploy.validate_config(stage)


# --- Lambda settings ----------------------------------------------------------------------------------


def test_visibility_timeouts_are_at_least_six_function_timeouts():
    config = chalice_config()
    timeouts = {name: spec.get("lambda_timeout", config["lambda_timeout"])
                for name, spec in config["lambda_functions"].items()}
    resources = yaml.safe_load(deploy.TEMPLATE.read_text(encoding="utf-8"))["Resources"]
    for worker, queue in (("intake_worker", "IntakeQueue"), ("callback_worker", "CallbacksQueue"),
                          ("recording_worker", "RecordingsQueue"), ("postback_worker", "PostbacksQueue"),
                          ("cdr_worker", "CdrsQueue")):
        assert resources[queue]["Properties"]["VisibilityTimeout"] >= 6 * timeouts[worker], worker


def _worst_request_seconds(retry, timeout) -> float:
    """Tries x (connect + read timeout) + urllib3's backoff sleeps between them."""
    tries = retry.total + 1
    sleeps = sum(min(retry.DEFAULT_BACKOFF_MAX, retry.backoff_factor * 2 ** (n - 1)) for n in range(2, tries + 1))
    return tries * sum(timeout) + sleeps


def test_function_timeouts_outlast_their_worst_retry_path():
    from functions.core import http
    from functions.providers.beeline import client as beeline
    from functions.tracking import reconciler

    read = _worst_request_seconds(http.idempotent_retry(), beeline.TIMEOUT)
    write = _worst_request_seconds(http.connect_only_retry(), beeline.TIMEOUT)
    functions = chalice_config()["lambda_functions"]
    # Keeper: read the current subscription, create a new one, delete the old one.
    assert functions["subscription_keeper"]["lambda_timeout"] > read + 2 * write
    # Reconciler: its time budget, then the call in hand may need one retried statistics read.
    assert functions["call_reconciler"]["lambda_timeout"] > reconciler.TIME_BUDGET_SECONDS + read


def test_callbacks_concurrency_follows_the_channel_limit(monkeypatch):
    from functions.core import config, resources

    monkeypatch.delenv("AWS_CHALICE_CLI_MODE", raising=False)
    assert resources.max_concurrency("callbacks") is None  # in Lambda: the config is not loaded for it
    monkeypatch.setenv("AWS_CHALICE_CLI_MODE", "true")
    monkeypatch.setenv("CALLBRIDGE_CONFIG", "config/prod.yaml")
    config.load.cache_clear()
    try:
        assert resources.max_concurrency("callbacks") == config.load().provider.channel_limit == 5
        assert resources.max_concurrency("intake") is None
    finally:
        config.load.cache_clear()


# --- URLs and the doctor ------------------------------------------------------------------------------


def test_paste_instructions_name_secrets_by_path_only():
    lines = deploy.paste_instructions("prod", "https://abc.execute-api.eu-central-1.amazonaws.com/api",
                                      deploy.app_routes(ROOT))
    text = "\n".join(lines)
    assert "https://abc.execute-api.eu-central-1.amazonaws.com/api/webhooks/tilda" in text
    assert "/callbridge/prod/tilda_api_key" in text
    base = "https://abc.execute-api.eu-central-1.amazonaws.com/api"
    assert f"SalesRender trigger webhook: {base}/webhooks/salesrender/<salesrender_webhook_secret>" in text
    assert f"SalesRender PBX plugin URL: {base}/salesrender-plugin/" in lines
    assert f"{base}/dashboard?token=" in text and "/callbridge/prod/callbridge_api_token" in text
    assert lines[-1].startswith("Beeline: nothing to do")


def test_deployed_api_url_becomes_public_base_url(tmp_path):
    (tmp_path / ".chalice" / "deployed").mkdir(parents=True)
    (tmp_path / ".chalice" / "deployed" / "prod.json").write_text(json.dumps({"resources": [
        {"name": "rest_api", "resource_type": "rest_api", "rest_api_id": "abc",
         "rest_api_url": "https://abc.execute-api.us-east-1.amazonaws.com/api/"}]}))
    assert deploy.deployed_api_url(tmp_path, "prod") == "https://abc.execute-api.us-east-1.amazonaws.com/api"


# --- replay-dlq ---------------------------------------------------------------------------------------


def test_replay_dlq_reaches_the_local_stack_without_hand_set_credentials(moto_url, monkeypatch, capsys):
    from functions.core import replay_dlq, resources

    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION", "CALLBRIDGE_STAGE",
                *(f"{k.upper()}_{s}" for k in QUEUES for s in ("QUEUE", "DLQ"))):
        # setenv first, so that monkeypatch restores what replay_dlq itself sets (it points at the stage).
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv("MOTO_PORT", moto_url.rsplit(":", 1)[-1])
    sqs = client(moto_url, "sqs")
    target = sqs.create_queue(QueueName="callbridge-local-intake")["QueueUrl"]
    dlq = sqs.create_queue(QueueName="callbridge-local-intake-dlq")["QueueUrl"]
    sqs.send_message(QueueUrl=dlq, MessageBody='{"lead_id": "L1"}',
                     MessageAttributes={"reason": {"DataType": "String", "StringValue": "order validation"}})
    try:
        assert replay_dlq.main(["intake", "--stage", "local", "--dry-run"]) == 0
        assert "order validation" in capsys.readouterr().out
        assert "Messages" not in sqs.receive_message(QueueUrl=target, WaitTimeSeconds=0)
        sqs.purge_queue(QueueUrl=dlq)  # the dry run left its copy invisible for 60 s: start from a fresh one
        sqs.send_message(QueueUrl=dlq, MessageBody='{"lead_id": "L1"}')
        assert replay_dlq.main(["intake", "--stage", "local"]) == 0
        assert "replayed 1 message(s) to callbridge-local-intake" in capsys.readouterr().out
        assert sqs.receive_message(QueueUrl=target)["Messages"][0]["Body"] == '{"lead_id": "L1"}'
    finally:
        resources.reset()


def test_replay_dlq_refuses_a_shell_stage_other_than_the_given_one(monkeypatch):
    from functions.core import replay_dlq

    monkeypatch.setenv("CALLBRIDGE_STAGE", "dev")
    with pytest.raises(SystemExit, match="CALLBRIDGE_STAGE=dev in your shell, but --stage prod"):
        replay_dlq.main(["intake", "--stage", "prod"], environ={"CALLBRIDGE_STAGE": "dev"})


def test_make_passes_dry_run_and_the_stage_to_replay_dlq():
    result = subprocess.run(["make", "-n", "replay-dlq", "QUEUE=intake", "DRY_RUN=1", "STAGE=local"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=True)
    assert "functions.core.replay_dlq intake --stage local --dry-run" in result.stdout
