"""The doctor (R-24; seed §2.1.3, §2.2.3, §5.1-5.2): finds a broken set-up with one command.

    make doctor [STAGE=local|dev|prod] [TEST_CALL=+79...] [OFFER=101]
    python -m functions.insight.doctor [--stage prod] [--test-call +79991234567 [--offer 101]]

Each check prints one line, OK / WARN / FAIL, and for WARN and FAIL the fix in English and in Russian:

- configuration: the document the stage runs (CALLBRIDGE_CONFIG, config/<stage>.yaml) is valid;
- secrets: every secret of infra/deploy.py is set (the value is never shown), PUBLIC_BASE_URL is set;
- AWS: the stack callbridge-<stage> and its table, queues, DLQs, bucket and topic exist; the bucket's
  lifecycle expires recordings after `provider.retention_days`; the DLQs are empty (WARN: a parked
  message needs a person, not a new deploy);
- Beeline: the token is accepted; every operator of every offer is an abonent and has recording on; the
  event subscription the keeper recorded is alive at Beeline and sends to this deployment's webhook;
- SalesRender: the token is accepted; each offer's project and status exist (a status outside the
  PROCESSING group is a WARN: the dialer calls only processing orders) and its field names exist with the
  right kind.
- `--test-call +79...`: a call through the app's own calls API (POST /v1/calls, so through an operator of
  the offer, the dialer, Beeline and the call events), followed to its end and its recording.

The exit status is 1 when anything FAILed, else 0; `make deploy` runs the doctor last.

It runs on the operator's machine with the operator's AWS credentials (never in Lambda, so its AWS calls
are not in the functions' policy; tests/test_iam.py lists it with the other operator tools). For
`--stage local` it reaches the local stack (`make run`: moto, the sandboxes, the app) on its default
ports, or the ones MOTO_PORT, BEELINE_SANDBOX_PORT, SALESRENDER_SANDBOX_PORT and CALLBRIDGE_PORT name;
for a deployed stage it takes the stage's environment from .chalice/config.json (written by the deploy)
and the names from the stack's outputs. Provider and AWS errors become findings, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[2]
SUBSCRIPTION_MIN_LEFT_SECONDS = 15 * 60
# A stack created or updated this recently (a deploy just ran) may have no subscription yet: the keeper makes it
# within its 5-minute schedule, so that is a WARN, not a FAIL (make deploy runs the doctor right away).
SUBSCRIPTION_GRACE_SECONDS = 15 * 60
TEST_CALL_TIMEOUT_SECONDS = 300
FIELD_KIND = {"phone": "phone", "name": "humanName", "email": "email", "comment": "string", "call_log": "string"}


@dataclasses.dataclass(frozen=True)
class Finding:
    status: str  # OK | WARN | FAIL
    check: str
    detail: str
    fix_en: str = ""
    fix_ru: str = ""

    def lines(self) -> list[str]:
        out = [f"{self.status:<5} {self.check}: {self.detail}"]
        if self.status != "OK" and self.fix_en:
            out.append(f"      fix: {self.fix_en}")
        if self.status != "OK" and self.fix_ru:
            out.append(f"      как исправить: {self.fix_ru}")
        return out


class Report:
    def __init__(self, out=None):
        self.findings: list[Finding] = []
        self._out = out
        self.stack_age_seconds: float | None = None  # since the stack was created or last updated

    def add(self, status: str, check: str, detail: str, fix_en: str = "", fix_ru: str = "") -> Finding:
        finding = Finding(status, check, detail, fix_en, fix_ru)
        self.findings.append(finding)
        print("\n".join(finding.lines()), file=self._out or sys.stdout, flush=True)
        return finding

    def ok(self, check: str, detail: str) -> Finding:
        return self.add("OK", check, detail)

    def warn(self, check: str, detail: str, fix_en: str, fix_ru: str) -> Finding:
        return self.add("WARN", check, detail, fix_en, fix_ru)

    def fail(self, check: str, detail: str, fix_en: str, fix_ru: str) -> Finding:
        return self.add("FAIL", check, detail, fix_en, fix_ru)

    @property
    def failed(self) -> bool:
        return any(f.status == "FAIL" for f in self.findings)

    def summary(self) -> str:
        counts = {s: sum(f.status == s for f in self.findings) for s in ("OK", "WARN", "FAIL")}
        return f"doctor: {counts['OK']} OK, {counts['WARN']} WARN, {counts['FAIL']} FAIL"


# --- the environment of a stage ---------------------------------------------------------------------------


def prepare_environment(stage: str | None, environ=None) -> str:
    """Point this process at a stage as its functions see it; returns the stage."""
    environ = os.environ if environ is None else environ
    shell = environ.get("CALLBRIDGE_STAGE")
    stage = stage or shell or "dev"
    if shell and shell != stage:
        raise SystemExit(f"CALLBRIDGE_STAGE={shell} in your shell, but --stage {stage}: make them equal")
    environ["CALLBRIDGE_STAGE"] = stage
    environ.setdefault("CALLBRIDGE_CONFIG", f"config/{stage}.yaml")
    if not (environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")):
        environ["AWS_DEFAULT_REGION"] = "us-east-1"
    if stage == "local":
        from infra.local.run import HOST, LOCAL_DEFAULTS  # the local stack's dummy credentials and names

        for key, value in LOCAL_DEFAULTS.items():
            environ.setdefault(key, value)
        environ.setdefault("AWS_ENDPOINT_URL", f"http://{HOST}:{environ.get('MOTO_PORT', '5000')}")
        environ.setdefault("BEELINE_API_URL",
                           f"http://{HOST}:{environ.get('BEELINE_SANDBOX_PORT', '8102')}/apis/portal/")
        environ.setdefault("SALESRENDER_API_URL", f"http://{HOST}:{environ.get('SALESRENDER_SANDBOX_PORT', '8101')}"
                                                  f"/companies/{environ.get('SALESRENDER_COMPANY_ID', '1')}/CRM")
        environ.setdefault("PUBLIC_BASE_URL", f"http://{HOST}:{environ.get('CALLBRIDGE_PORT', '8000')}")
    else:
        path = ROOT / ".chalice" / "config.json"
        if path.exists():  # what `make deploy` wrote for the stage: its names, PUBLIC_BASE_URL, company id
            chalice = json.loads(path.read_text(encoding="utf-8"))
            stage_env = {**chalice.get("environment_variables", {}),
                         **chalice.get("stages", {}).get(stage, {}).get("environment_variables", {})}
            for key, value in stage_env.items():
                environ.setdefault(key, str(value))
    from functions.core import config, resources

    resources.reset()
    config.load.cache_clear()
    return stage


# --- the checks -----------------------------------------------------------------------------------------


def check_config(report: Report):
    from functions.core import config

    try:
        document = config.load()
    except config.ConfigError as exc:
        report.fail("configuration", str(exc), "correct the key named above in the configuration document",
                    "исправьте названный ключ в файле конфигурации")
        return None
    shown = os.environ.get("CALLBRIDGE_CONFIG", config.DEFAULT_CONFIG)
    report.ok("configuration", f"{shown} is valid ({len(document.offers)} offers)")
    return document


def check_secrets(report: Report, stage: str) -> None:
    from functions.core import secrets
    from infra.deploy import GENERATED_SECRETS, PROVIDER_SECRETS

    for name in (*GENERATED_SECRETS, *PROVIDER_SECRETS):
        try:
            secrets.get(name)
        except secrets.MissingSecret:
            where = PROVIDER_SECRETS.get(name)
            detail = f"not set (environment variable {name} or SSM /callbridge/{stage}/{name.lower()})"
            if stage == "local":  # the local stack's dummies: infra/local/run.py LOCAL_DEFAULTS, or the shell
                report.fail(f"secret {name}", detail, f"set the environment variable {name} for `make run` and "
                            "the doctor alike", f"задайте переменную окружения {name} для `make run` и doctor")
            else:
                report.fail(f"secret {name}", detail,
                            f"`make deploy STAGE={stage}` creates it ({where or 'generated'})",
                            f"`make deploy STAGE={stage}` создаст его ({where or 'сгенерирует'})")
        except Exception as exc:  # noqa: BLE001 - SSM unreachable, no credentials: a finding, not a traceback
            report.fail(f"secret {name}", f"cannot be read: {type(exc).__name__}: {str(exc)[:200]}",
                        "check your AWS credentials and region", "проверьте учётные данные и регион AWS")
        else:
            report.ok(f"secret {name}", "set")
    if os.environ.get("PUBLIC_BASE_URL"):
        report.ok("PUBLIC_BASE_URL", os.environ["PUBLIC_BASE_URL"])
    else:
        report.fail("PUBLIC_BASE_URL", "not set: Beeline cannot be told where to send call events",
                    f"`make deploy STAGE={stage}` writes the API's URL into .chalice/config.json",
                    f"`make deploy STAGE={stage}` запишет адрес API в .chalice/config.json")


def _aws_error(exc: Exception) -> str:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code") if hasattr(exc, "response") else None
    return f"{code or type(exc).__name__}: {str(exc)[:200]}"


def check_aws(report: Report, stage: str, document) -> None:
    from functions.core import resources
    from infra.local.stack import OUTPUT_ENV

    deploy_hint = ("start `make run`" if stage == "local" else f"run `make deploy STAGE={stage}`",
                   "запустите `make run`" if stage == "local" else f"выполните `make deploy STAGE={stage}`")
    name = f"callbridge-{stage}"
    try:
        stacks = resources.client("cloudformation").describe_stacks(StackName=name)["Stacks"]
    except Exception as exc:  # noqa: BLE001
        report.fail("aws stack", f"{name}: {_aws_error(exc)}", *deploy_hint)
        return
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stacks[0].get("Outputs") or []}
    changed = stacks[0].get("LastUpdatedTime") or stacks[0].get("CreationTime")
    if changed is not None:
        report.stack_age_seconds = time.time() - changed.timestamp()
    problems = []
    for key, var in OUTPUT_ENV.items():
        if key not in outputs:
            problems.append(f"output {key} missing")
        elif os.environ.get(var) and os.environ[var] != outputs[key]:
            problems.append(f"{var}={os.environ[var]} but the stack says {outputs[key]}")
        else:
            os.environ[var] = outputs[key]
    if problems:
        report.fail("aws stack", f"{name} ({stacks[0]['StackStatus']}): " + "; ".join(problems), *deploy_hint)
    else:
        report.ok("aws stack", f"{name} {stacks[0]['StackStatus']}")
    resources.reset()

    missing = []
    probes = [("table " + resources.table_name(),
               lambda: resources.client("dynamodb").describe_table(TableName=resources.table_name())),
              ("bucket " + resources.bucket_name(), lambda: resources.client("s3").head_bucket(
                  Bucket=resources.bucket_name()))]
    if resources.alerts_topic_arn():
        probes.append(("topic " + resources.alerts_topic_arn().rsplit(":", 1)[-1], lambda: resources.client(
            "sns").get_topic_attributes(TopicArn=resources.alerts_topic_arn())))
    for kind in resources.QUEUES:
        for dlq in (False, True):
            probes.append((f"queue {resources.dlq_name(kind) if dlq else resources.queue_name(kind)}",
                           lambda k=kind, d=dlq: resources.queue_url(k, dlq=d)))
    for label, probe in probes:
        try:
            probe()
        except Exception as exc:  # noqa: BLE001
            missing.append(f"{label} ({_aws_error(exc).split(':')[0]})")
    if missing:
        report.fail("aws resources", "missing: " + "; ".join(missing), *deploy_hint)
        return
    report.ok("aws resources", f"table, bucket, topic and {2 * len(resources.QUEUES)} queues exist")
    if document is not None:
        _check_lifecycle(report, stage, document.provider.retention_days)
    _check_dlqs(report, stage)


def _check_lifecycle(report: Report, stage: str, retention_days: int) -> None:
    from functions.core import resources

    bucket = resources.bucket_name()
    try:
        rules = resources.client("s3").get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    except Exception as exc:  # noqa: BLE001 - NoSuchLifecycleConfiguration included
        rules, error = [], _aws_error(exc)
    else:
        error = ""
    whole = [r for r in rules if r.get("Status") == "Enabled" and not (r.get("Filter") or {}).get("Prefix", "")
             and not (r.get("Filter") or {}).get("And") and not r.get("Prefix")]
    days = sorted({(r.get("Expiration") or {}).get("Days") for r in whole} - {None})
    if days == [retention_days]:
        report.ok("recordings lifecycle", f"{bucket} expires recordings after {retention_days} days "
                  "(provider.retention_days)")
        return
    found = f"expires after {', '.join(map(str, days))} days" if days else f"no expiry rule ({error or 'none'})"
    report.fail("recordings lifecycle", f"{bucket}: {found}, but provider.retention_days is {retention_days}",
                f"`make deploy STAGE={stage}` sets the bucket's lifecycle from provider.retention_days",
                f"`make deploy STAGE={stage}` настроит срок хранения записей по provider.retention_days")


def _check_dlqs(report: Report, stage: str) -> None:
    from functions.core import resources

    for kind in resources.QUEUES:
        try:
            attributes = resources.client("sqs").get_queue_attributes(
                QueueUrl=resources.queue_url(kind, dlq=True),
                AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        except Exception as exc:  # noqa: BLE001
            report.fail(f"dlq {kind}", _aws_error(exc), "check your AWS credentials", "проверьте учётные данные AWS")
            continue
        parked = sum(int(v) for v in attributes.values())
        if parked:
            report.warn(f"dlq {kind}", f"{parked} message(s) parked in {resources.dlq_name(kind)}",
                        f"read their reasons with `make replay-dlq QUEUE={kind} STAGE={stage} DRY_RUN=1`, fix the "
                        f"cause, then replay them with `make replay-dlq QUEUE={kind} STAGE={stage}`",
                        f"причины: `make replay-dlq QUEUE={kind} STAGE={stage} DRY_RUN=1`; устраните причину и "
                        f"верните сообщения: `make replay-dlq QUEUE={kind} STAGE={stage}`")
        else:
            report.ok(f"dlq {kind}", "empty")


def _abonent_for(pattern: str, abonents: list[dict]) -> dict | None:
    digits = "".join(ch for ch in pattern if ch.isdigit())[-10:]
    for abonent in abonents:
        candidates = {str(abonent.get(k) or "") for k in ("extension", "userId", "phone")}
        if pattern in candidates or (len(digits) == 10 and digits == str(abonent.get("phone") or "")[-10:]):
            return abonent
    return None


def check_beeline(report: Report, stage: str, document) -> None:
    from functions.providers.beeline import client as beeline

    token_fix = (f"put a valid token from the Beeline portal (Settings -> API, X-MPBX-API-AUTH-TOKEN) into "
                 f"{_secret_place('BEELINE_API_TOKEN', stage)}",
                 f"укажите действующий токен из портала Beeline (Настройки -> API) в "
                 f"{_secret_place('BEELINE_API_TOKEN', stage, ru=True)}")
    try:
        client = beeline.default_client()
        abonents = client.abonents()
    except beeline.BeelineError as exc:
        if exc.status in (401, 403):
            report.fail("beeline token", f"rejected by Beeline ({exc.code})", *token_fix)
        else:
            report.fail("beeline token", f"cannot reach Beeline at {beeline.api_url()}: {exc}",
                        "check BEELINE_API_URL and the network; retry later if Beeline is down",
                        "проверьте BEELINE_API_URL и сеть; если Beeline недоступен, повторите позже")
        return
    except Exception as exc:  # noqa: BLE001 - a missing secret (reported above) or an odd answer
        report.fail("beeline token", f"{type(exc).__name__}: {str(exc)[:200]}", *token_fix)
        return
    report.ok("beeline token", f"accepted ({len(abonents)} abonents)")
    if document is None:
        return
    known = ", ".join(sorted(str(a.get("extension") or a.get("userId")) for a in abonents)) or "none"
    checked: set[str] = set()
    for index, offer in enumerate(document.offers):
        for pattern in offer.operators:
            check = f"beeline operator {pattern} (offer {offer.id})"
            abonent = _abonent_for(pattern, abonents)
            if abonent is None:
                report.fail(check, f"no such abonent at Beeline (abonents: {known})",
                            f"put an abonent's extension from the Beeline portal into offers[{index}].operators, "
                            "or create the abonent in the portal",
                            f"укажите в offers[{index}].operators внутренний номер существующего абонента или "
                            "создайте абонента в портале Beeline")
                continue
            if pattern in checked:
                continue
            checked.add(pattern)
            if not document.provider.recording:
                report.ok(check, "abonent exists (recording not required: provider.recording is false)")
                continue
            try:
                state = client.recording(pattern)
            except beeline.BeelineError as exc:
                report.fail(check, f"abonent exists; its recording switch cannot be read: {exc}",
                            "retry later; check the token's rights", "повторите позже; проверьте права токена")
                continue
            if state == "ON":
                report.ok(check, "abonent exists, recording ON")
            else:
                report.fail(check, f"abonent exists, but recording is {state or 'unknown'}",
                            f"turn call recording on for abonent {pattern} in the Beeline portal (or "
                            f"PUT abonents/{pattern}/recording); without it no call is recorded",
                            f"включите запись разговоров для абонента {pattern} в портале Beeline; без неё "
                            "записи звонков не будет")
    _check_subscription(report, stage, client)


def _masked(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path.rsplit('/', 1)[0]}/…"


def _check_subscription(report: Report, stage: str, client) -> None:
    from functions.providers.beeline import client as beeline
    from functions.tracking import subscriptions

    wait_fix = ("the subscription keeper (every 5 minutes) makes it: wait 5 minutes, then look at the "
                "subscription_keeper log if it stays so",
                "подписку создаёт subscription_keeper (каждые 5 минут): подождите 5 минут; если не помогло, "
                "смотрите журнал subscription_keeper")
    try:
        url = subscriptions.webhook_url()
        record = subscriptions.current()
    except Exception as exc:  # noqa: BLE001 - no PUBLIC_BASE_URL or secret (reported above), table unreachable
        report.fail("beeline subscription", f"cannot be checked: {str(exc)[:200]}", *wait_fix)
        return
    if record is None:
        age = report.stack_age_seconds
        if age is not None and age < SUBSCRIPTION_GRACE_SECONDS:
            report.warn("beeline subscription", f"none yet (the stack changed {age / 60:.0f} min ago)", *wait_fix)
        else:
            report.fail("beeline subscription", "none recorded: Beeline sends no call events", *wait_fix)
        return
    if record.get("url_sha256") != hashlib.sha256(url.encode()).hexdigest():
        report.fail("beeline subscription", f"recorded for {record.get('url')}, not for {_masked(url)} "
                    "(PUBLIC_BASE_URL or the webhook secret changed)", *wait_fix)
        return
    subscription_id = str(record["subscription_id"])
    try:
        info = client.subscription(subscription_id)
    except beeline.BeelineError as exc:
        report.fail("beeline subscription", f"{subscription_id} unknown to Beeline ({exc.code}): expired or "
                    "terminated", *wait_fix)
        return
    if not isinstance(info, dict) or info.get("errorCode"):
        report.fail("beeline subscription", f"{subscription_id} unknown to Beeline", *wait_fix)
        return
    if info.get("url") and info["url"] != url:
        report.fail("beeline subscription", f"{subscription_id} sends events to {_masked(str(info['url']))}, "
                    f"not to this deployment ({_masked(url)})", *wait_fix)
        return
    left = info.get("expires")
    if isinstance(left, int | float) and left < SUBSCRIPTION_MIN_LEFT_SECONDS:
        report.warn("beeline subscription", f"{subscription_id} alive but only {int(left)} s left", *wait_fix)
        return
    shown = f"{int(left)} s left" if isinstance(left, int | float) else "alive"
    report.ok("beeline subscription", f"{subscription_id} {info.get('subscriptionType', '')} to {_masked(url)}, "
              f"{shown}".replace("  ", " "))


def _secret_place(name: str, stage: str, ru: bool = False) -> str:
    if stage == "local":
        return f"переменную окружения {name}" if ru else f"the environment variable {name}"
    path = f"/callbridge/{stage}/{name.lower()}"
    return f"параметр SSM {path}" if ru else f"the SSM parameter {path}"


def check_salesrender(report: Report, stage: str, document) -> None:
    from functions.providers.salesrender import client as salesrender
    from functions.providers.salesrender import introspect

    token_fix = (f"put a valid API token of the company (SalesRender: company settings -> API tokens) into "
                 f"{_secret_place('SALESRENDER_API_TOKEN', stage)}",
                 f"укажите действующий API-токен компании (SalesRender: настройки компании -> API-токены) в "
                 f"{_secret_place('SALESRENDER_API_TOKEN', stage, ru=True)}")
    try:
        client = salesrender.default_client()
        statuses = {str(s.get("id")): s for s in introspect.statuses(client)}
        projects = {str(p.get("id")): p for p in introspect.projects(client)}
        fields = {str(f.get("name")): f for f in introspect.order_fields(client)}
    except salesrender.SalesRenderError as exc:
        if exc.status in salesrender.AUTH_STATUSES or exc.code in salesrender.AUTH_CODES:
            report.fail("salesrender token", f"rejected by SalesRender ({exc.code})", *token_fix)
        else:
            report.fail("salesrender token", f"cannot read {salesrender.api_url()}: {exc}",
                        "check SALESRENDER_API_URL / SALESRENDER_COMPANY_ID and the network",
                        "проверьте SALESRENDER_API_URL / SALESRENDER_COMPANY_ID и сеть")
        return
    except Exception as exc:  # noqa: BLE001
        report.fail("salesrender token", f"{type(exc).__name__}: {str(exc)[:200]}", *token_fix)
        return
    report.ok("salesrender token", f"accepted ({len(projects)} projects, {len(statuses)} statuses, "
              f"{len(fields)} order fields)")
    if document is None:
        return
    for index, offer in enumerate(document.offers):
        sr, where = offer.salesrender, f"offers[{index}].salesrender"
        check = f"salesrender offer {offer.id}"
        problems = []
        if sr.project_id not in projects:
            problems.append((f"project {sr.project_id} does not exist (projects: {', '.join(sorted(projects))})",
                             f"{where}.project_id"))
        status = statuses.get(sr.status_id)
        if status is None:
            problems.append((f"status {sr.status_id} does not exist (statuses: {', '.join(sorted(statuses))})",
                             f"{where}.status_id"))
        elif status.get("archived"):
            problems.append((f"status {sr.status_id} ({status.get('name')}) is archived", f"{where}.status_id"))
        for key, kind in FIELD_KIND.items():
            name = getattr(sr.fields, key)
            if name is None:
                continue
            field = fields.get(name)
            if field is None:
                problems.append((f"order field {name!r} ({key}) does not exist", f"{where}.fields.{key}"))
            elif field.get("kind") != kind:
                problems.append((f"order field {name!r} ({key}) is of kind {field.get('kind') or 'another'}, "
                                 f"not {kind}", f"{where}.fields.{key}"))
        for detail, key in problems:
            report.fail(check, detail, f"set {key} to a name that exists in SalesRender (CRM -> settings), or "
                        "create it there", f"укажите в {key} существующее в SalesRender значение или создайте его")
        if problems:
            continue
        if status.get("group") != "PROCESSING":
            report.warn(check, f"new orders get status {sr.status_id} ({status.get('name')}), group "
                        f"{status.get('group')}: the dialer calls only orders in PROCESSING",
                        f"set {where}.status_id to a status of the PROCESSING group",
                        f"укажите в {where}.status_id статус группы PROCESSING («в обработке»)")
            continue
        report.ok(check, f"project {sr.project_id}, status {sr.status_id} ({status.get('name')}), fields "
                  + ", ".join(n for n in (getattr(sr.fields, k) for k in FIELD_KIND) if n))


# --- the test call (seed §2.2.3) --------------------------------------------------------------------------


def place_test_call(report: Report, phone: str, offer_id: int | None, document,
                    timeout: float = TEST_CALL_TIMEOUT_SECONDS, session=None, out=None) -> None:
    """A call through the app's calls API, followed to its end: the whole chain as a lead would get it."""
    import requests

    from functions.core import phones, secrets

    check = "test call"
    try:
        e164 = phones.normalise(phone)
    except phones.InvalidPhone as exc:
        report.fail(check, f"{exc}", "give a mobile number, e.g. +79991234567", "укажите мобильный номер, "
                    "например +79991234567")
        return
    if document is None:
        report.fail(check, "no valid configuration", "fix the configuration first", "сначала исправьте конфигурацию")
        return
    offer = document.offer(offer_id) if offer_id is not None else document.offers[0]
    if offer is None:
        report.fail(check, f"no offer {offer_id}", "name an offer id of the configuration with --offer",
                    "укажите id оффера из конфигурации (--offer)")
        return
    base = (os.environ.get("PUBLIC_BASE_URL") or "").rstrip("/")
    http = session or requests.Session()
    try:
        headers = {"Authorization": f"Bearer {secrets.get('CALLBRIDGE_API_TOKEN')}",
                   "Idempotency-Key": f"doctor-{uuid.uuid4()}"}
        answer = http.post(f"{base}/v1/calls", json={"phone": e164, "offer_id": offer.id}, headers=headers,
                           timeout=15)
    except Exception as exc:  # noqa: BLE001
        report.fail(check, f"the app's API at {base} cannot be reached: {type(exc).__name__}",
                    "check PUBLIC_BASE_URL (make run, or the deployed API)", "проверьте PUBLIC_BASE_URL")
        return
    if answer.status_code != 202:
        report.fail(check, f"POST /v1/calls answered {answer.status_code}: {answer.text[:200]}",
                    "fix what the answer names", "исправьте то, что названо в ответе")
        return
    call_id = answer.json()["call_id"]

    def say(text: str) -> None:
        print(f"      {text}", file=out or sys.stdout, flush=True)

    say(f"test call {call_id}: offer {offer.id}, {phones.mask(e164)}")
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    call: dict = {}
    while time.monotonic() < deadline:
        response = http.get(f"{base}/v1/calls/{call_id}", headers=headers, timeout=15)
        if response.status_code == 200:
            call = response.json()
            steps = [(f"dialing: operator {call.get('operator')} rings first", call.get("state") != "queued"),
                     ("answered", call.get("answered_at") is not None),
                     (f"ended: {call.get('outcome')}, {call.get('talk_seconds')} s, {call.get('cost_rub')} RUB",
                      call.get("state") == "ended")]
            for label, happened in steps:
                if happened and label not in seen:
                    seen.add(label)
                    say(label)
            if call.get("state") == "ended" and (call.get("outcome") != "answered" or call.get("recording_url")
                                                  or not document.provider.recording):
                break
        time.sleep(1)
    outcome = call.get("outcome")
    if call.get("state") != "ended":
        report.fail(check, f"still {call.get('state', 'queued')} after {timeout:.0f} s",
                    "look at the callback_worker log; is the operator online and a channel free?",
                    "смотрите журнал callback_worker; оператор в сети, есть свободный канал?")
    elif outcome == "answered" and (call.get("recording_url") or not document.provider.recording):
        report.ok(check, f"answered through operator {call.get('operator')}, {call.get('talk_seconds')} s"
                  + (", recording stored" if call.get("recording_url") else ""))
    elif outcome == "answered":
        report.warn(check, "answered, but no recording stored yet (it can take minutes)",
                    "check the recording switch of the operator's abonent; look at the recording_worker log",
                    "проверьте запись разговоров абонента; смотрите журнал recording_worker")
    elif outcome == "operator_missed":
        report.fail(check, f"operator {call.get('operator')} did not answer the first ring",
                    "answer the operator's phone first: the customer is dialled after it",
                    "сначала ответьте на телефоне оператора: клиенту звонят после него")
    else:
        report.fail(check, f"ended {outcome}" + (f" ({call.get('reason')})" if call.get("reason") else ""),
                    "answer the test phone; a failed call is described in the callback_worker log",
                    "ответьте на тестовом телефоне; ошибка описана в журнале callback_worker")


# --- the command ----------------------------------------------------------------------------------------


def run(stage: str, report: Report, test_call_phone: str | None = None, offer_id: int | None = None,
        timeout: float = TEST_CALL_TIMEOUT_SECONDS) -> Report:
    document = check_config(report)
    check_secrets(report, stage)
    check_aws(report, stage, document)
    check_beeline(report, stage, document)
    check_salesrender(report, stage, document)
    if test_call_phone:
        place_test_call(report, test_call_phone, offer_id, document, timeout)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default=None, help="local, dev, prod (default: CALLBRIDGE_STAGE, else dev)")
    parser.add_argument("--test-call", metavar="PHONE", help="place a test call to this phone (+79...)")
    parser.add_argument("--offer", type=int, help="the offer of the test call (default: the first)")
    parser.add_argument("--timeout", type=float, default=TEST_CALL_TIMEOUT_SECONDS, help="test call: seconds to wait")
    parser.add_argument("--verbose", action="store_true", help="also show the app's own log lines")
    args = parser.parse_args(argv)
    stage = prepare_environment(args.stage)
    if not args.verbose:
        # The clients log and emit metrics as they would in Lambda (a rejected token, say): here the findings
        # say it, so those lines would only bury them.
        os.environ["POWERTOOLS_METRICS_DISABLED"] = "true"
        from functions.core.observability import logger

        logger.setLevel("CRITICAL")
    print(f"callbridge doctor: stage {stage}, configuration {os.environ['CALLBRIDGE_CONFIG']}", flush=True)
    report = run(stage, Report(), args.test_call, args.offer, args.timeout)
    print(report.summary(), flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
