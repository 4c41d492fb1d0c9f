"""The doctor (R-24, issue 11 item 6): all OK on a healthy set-up, and on a broken one it names exactly what
is broken (a wrong token, a missing field name, a missing abonent, ...), with the fix in English and Russian.

In-process: moto with the template's stack, the strict Beeline and SalesRender sandboxes. End to end: the
doctor as a command against `make run`, with a test call followed to its end.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from functions.core import resources
from functions.insight import doctor
from functions.tracking import subscriptions
from infra.deploy import GENERATED_SECRETS

ROOT = doctor.ROOT


@pytest.fixture
def healthy(aws, salesrender_sandbox, beeline_sandbox, monkeypatch):
    """A set-up with nothing wrong: every secret set, the subscription made by the keeper."""
    for name in GENERATED_SECRETS:
        monkeypatch.setenv(name, os.environ.get(name) or f"test-{name.lower()}")
    monkeypatch.setenv("PUBLIC_BASE_URL", "https://api.example.test/api")
    assert subscriptions.keep() == "created"
    return {"crm": salesrender_sandbox, "pbx": beeline_sandbox}


def examine() -> tuple[doctor.Report, str]:
    out = io.StringIO()
    report = doctor.run(resources.stage(), doctor.Report(out))
    return report, out.getvalue()


def failed(report: doctor.Report) -> dict[str, str]:
    return {f.check: f.detail for f in report.findings if f.status == "FAIL"}


def test_a_healthy_setup_is_all_ok(healthy):
    report, text = examine()
    assert failed(report) == {} and not [f for f in report.findings if f.status == "WARN"], text
    checks = {f.check for f in report.findings}
    assert {"configuration", "beeline token", "beeline subscription", "salesrender token", "aws stack",
            "aws resources", "recordings lifecycle", "secret BEELINE_API_TOKEN", "PUBLIC_BASE_URL"} <= checks
    assert {"beeline operator 200 (offer 101)", "beeline operator 201 (offer 101)",
            "beeline operator 202 (offer 102)", "salesrender offer 101", "salesrender offer 102"} <= checks
    assert {f"dlq {kind}" for kind in resources.QUEUES} <= checks
    assert "OK    beeline operator 200 (offer 101): abonent exists, recording ON" in text
    assert "OK    recordings lifecycle: " in text and "after 30 days" in text
    for name in GENERATED_SECRETS:
        assert os.environ[name] not in text  # a secret's value is never shown


def test_a_wrong_beeline_token_is_named(healthy, monkeypatch):
    healthy["pbx"].token = "the-token-beeline-now-wants"
    report, text = examine()
    assert failed(report) == {"beeline token": "rejected by Beeline (AuthTokenNotFound)"}
    assert "fix: put a valid token from the Beeline portal" in text
    assert "как исправить: укажите действующий токен из портала Beeline" in text


def test_a_missing_abonent_and_recording_off_are_named(healthy, use_config):
    use_config(lambda doc: doc["offers"][0].update(operators=["200", "299"]))
    healthy["pbx"].set_recording("200", False)
    report, text = examine()
    assert failed(report) == {
        "beeline operator 299 (offer 101)": "no such abonent at Beeline (abonents: " + ", ".join(
            str(n) for n in range(200, 212)) + ")",
        "beeline operator 200 (offer 101)": "abonent exists, but recording is OFF",
    }
    assert "offers[0].operators" in text


def test_a_missing_field_name_and_an_unknown_status_are_named(healthy, use_config):
    def broken(doc):
        doc["offers"][0]["salesrender"]["fields"]["call_log"] = "call_history"
        doc["offers"][1]["salesrender"]["status_id"] = "9"

    use_config(broken)
    report, text = examine()
    assert failed(report) == {"salesrender offer 101": "order field 'call_history' (call_log) does not exist",
                              "salesrender offer 102": "status 9 does not exist (statuses: 1, 2, 3, 4)"}
    assert "fix: set offers[0].salesrender.fields.call_log to a name that exists in SalesRender" in text


def test_a_field_of_the_wrong_kind_an_archived_and_a_non_processing_status(healthy, use_config):
    def odd(doc):
        doc["offers"][0]["salesrender"]["fields"]["phone"] = "comment"  # a string field, not a phone field
        doc["offers"][1]["salesrender"]["status_id"] = "2"  # APPROVED: the dialer would never call

    use_config(odd)
    report, _ = examine()
    assert failed(report) == {"salesrender offer 101": "order field 'comment' (phone) is of kind string, not phone"}
    [warning] = [f for f in report.findings if f.status == "WARN"]
    assert warning.check == "salesrender offer 102" and "group APPROVED" in warning.detail
    use_config(lambda doc: doc["offers"][1]["salesrender"].update(status_id="4"))
    assert failed(examine()[0]) == {"salesrender offer 102": "status 4 (Старый) is archived"}


def test_a_wrong_salesrender_token_is_named(healthy):
    healthy["crm"].token = "another-token"
    report, text = examine()
    assert failed(report) == {"salesrender token": "rejected by SalesRender (ERR_UNAUTHORIZED)"}
    assert "company settings -> API tokens" in text


def test_a_subscription_gone_at_beeline_or_for_another_url_is_named(healthy, monkeypatch):
    [sub] = healthy["pbx"].subscriptions()
    healthy["pbx"].terminate_subscription(sub["subscriptionId"])
    report, _ = examine()
    assert list(failed(report)) == ["beeline subscription"]
    assert "unknown to Beeline" in failed(report)["beeline subscription"]
    monkeypatch.setenv("PUBLIC_BASE_URL", "https://another.example.test/api")
    detail = failed(examine()[0])["beeline subscription"]
    assert "not for https://another.example.test/api/webhooks/beeline/…" in detail


def test_no_subscription_is_a_fail_unless_a_deploy_just_ran(healthy, monkeypatch):
    resources.table().delete_item(Key=subscriptions.CURRENT)
    report, _ = examine()  # the module's stack was created seconds ago: the keeper has 5 minutes to make it
    assert failed(report) == {}
    [warning] = [f for f in report.findings if f.status == "WARN"]
    assert warning.check == "beeline subscription" and warning.detail.startswith("none yet (the stack changed ")
    monkeypatch.setattr(doctor, "SUBSCRIPTION_GRACE_SECONDS", 0)
    assert failed(examine()[0]) == {"beeline subscription": "none recorded: Beeline sends no call events"}


def test_a_missing_secret_a_lifecycle_off_the_retention_and_parked_messages(healthy, monkeypatch, use_config):
    monkeypatch.delenv("RECORDING_LINK_SECRET")
    use_config(lambda doc: doc["provider"].update(retention_days=7))
    resources.client("sqs").send_message(QueueUrl=resources.queue_url("intake", dlq=True), MessageBody="{}")
    report, text = examine()
    problems = failed(report)
    assert problems == {
        "secret RECORDING_LINK_SECRET": "not set (environment variable RECORDING_LINK_SECRET or SSM "
                                        "/callbridge/test/recording_link_secret)",
        "recordings lifecycle": f"{resources.bucket_name()}: expires after 30 days, but provider.retention_days is 7",
    }
    [warning] = [f for f in report.findings if f.status == "WARN"]
    assert warning.check == "dlq intake" and warning.detail.startswith("1 message(s) parked")
    assert "make replay-dlq QUEUE=intake STAGE=test DRY_RUN=1" in text


def test_a_missing_stack_and_names_that_are_not_the_stacks_are_named(healthy, monkeypatch):
    monkeypatch.setenv("CDRS_DLQ", "callbridge-test-cdrs-dlq-old")
    assert failed(examine()[0]) == {
        "aws stack": "callbridge-test (CREATE_COMPLETE): CDRS_DLQ=callbridge-test-cdrs-dlq-old but the stack says "
                     "callbridge-test-cdrs-dlq",
        "aws resources": "missing: queue callbridge-test-cdrs-dlq-old (AWS.SimpleQueueService.NonExistentQueue)"}
    monkeypatch.setenv("CALLBRIDGE_STAGE", "nowhere")
    resources.reset()
    report, _ = examine()
    assert failed(report)["aws stack"].startswith("callbridge-nowhere: ValidationError")


def test_an_invalid_configuration_is_named_and_the_rest_still_checked(healthy, use_config):
    use_config(lambda doc: doc["offers"][0].update(caller_id="84951234567"))
    report, _ = examine()
    assert list(failed(report)) == ["configuration"]
    assert "offers.0.caller_id" in failed(report)["configuration"]
    assert {"beeline token", "salesrender token", "aws resources"} <= {f.check for f in report.findings}


def test_the_command_exits_non_zero_on_a_fail(healthy, monkeypatch, capsys):
    from functions.core.observability import logger

    level = logger.level
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")  # restored after the test, like the level
    try:
        assert doctor.main(["--stage", "test"]) == 0
        healthy["pbx"].token = "rotated"
        assert doctor.main(["--stage", "test"]) == 1
    finally:
        logger.setLevel(level)
    out = capsys.readouterr().out
    assert "callbridge doctor: stage test" in out
    assert out.rstrip().endswith("1 FAIL")
    assert "ProviderAuthFailed" not in out  # the clients' own metric lines are not mixed into the findings


# --- against the local stack -------------------------------------------------------------------------------


@pytest.mark.e2e
def test_the_doctor_against_make_run_is_all_ok_and_its_test_call_reaches_the_end(tmp_path):
    import requests
    from test_e2e_local_stack import CONFTEST_KEYS, make_run, wait_until

    # PLUGIN_ENCRYPTION_KEY is not among infra/local/run.py's LOCAL_DEFAULTS yet (the doctor names it when it
    # is missing): given to the stack and to the doctor alike, as tests/test_e2e_crm_plugin.py does.
    plugin_key = {"PLUGIN_ENCRYPTION_KEY": "local-plugin-encryption-key"}
    with make_run(tmp_path, FRESH="1", **plugin_key) as running:
        # `ready` comes before the runner's first keeper tick has made the Beeline subscription.
        wait_until(lambda: requests.get(running["pbx"] + "/_sandbox/subscriptions", timeout=5).json(), 60,
                   "the subscription keeper's first run")
        env = {k: v for k, v in os.environ.items() if k not in CONFTEST_KEYS}
        env.update({k: str(v) for k, v in running["ports"].items()}, **plugin_key)
        result = subprocess.run([sys.executable, "-m", "functions.insight.doctor", "--stage", "local",
                                 "--test-call", "+79991112233", "--timeout", "120"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.startswith(("FAIL", "WARN"))]
    assert any(line.startswith("OK    beeline subscription: ") for line in lines)
    assert any(line.startswith("OK    test call: answered through operator 20") for line in lines)
    assert "+79991112233" not in result.stdout  # the phone is masked
    assert lines[-1].startswith("doctor: ") and lines[-1].endswith(" 0 WARN, 0 FAIL")
