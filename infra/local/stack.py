"""Create callbridge's AWS resources on moto from infra/template.yaml, the template production uses.

The stack goes through moto's CloudFormation, so the local names, redrive policies and keys come from
the template itself. moto 5.2.5's CloudFormation silently drops some properties and resource types;
`deploy()` then reads those from the template's own resources (parameters resolved) and applies them
through the service APIs, so there is still no second hand-kept list:

- S3 bucket: LifecycleConfiguration, PublicAccessBlockConfiguration, OwnershipControls are dropped and
  BucketEncryption loses BucketKeyEnabled; `AWS::S3::BucketPolicy` is not supported.
- DynamoDB table: TimeToLiveSpecification and PointInTimeRecoverySpecification are dropped.
  (SSESpecification is misread, but moto has no API to change it; it has no local effect anyway.)
- `AWS::SNS::Subscription` is not supported (applied when its Condition holds).
- `AWS::CloudWatch::Alarm` is not supported (moto warns); alarms are not created locally.

    python -m infra.local.stack --endpoint-url http://127.0.0.1:5000 --stage local
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import yaml

TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "template.yaml"
# libyaml's loader when present: the pure-Python one costs ~0.1 s per deploy, and tests deploy often.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Stack output -> environment variable read by functions/core/resources.py.
OUTPUT_ENV = {
    "IntakeQueueName": "INTAKE_QUEUE",
    "IntakeDlqName": "INTAKE_DLQ",
    "CallbacksQueueName": "CALLBACKS_QUEUE",
    "CallbacksDlqName": "CALLBACKS_DLQ",
    "RecordingsQueueName": "RECORDINGS_QUEUE",
    "RecordingsDlqName": "RECORDINGS_DLQ",
    "PostbacksQueueName": "POSTBACKS_QUEUE",
    "PostbacksDlqName": "POSTBACKS_DLQ",
    "CdrsQueueName": "CDRS_QUEUE",
    "CdrsDlqName": "CDRS_DLQ",
    "StateTableName": "STATE_TABLE",
    "RecordingsBucketName": "RECORDINGS_BUCKET",
    "AlertsTopicArn": "ALERTS_TOPIC_ARN",
}

# A stack whose creation failed cannot be updated, only deleted and created again.
_RECREATE = {"ROLLBACK_COMPLETE", "ROLLBACK_FAILED", "CREATE_FAILED", "DELETE_FAILED"}


class _NoValue:
    """`Ref: AWS::NoValue`: the property is removed."""


NO_VALUE = _NoValue()


# --- template ----------------------------------------------------------------------------------------


def load_template(path: str | os.PathLike | None = None) -> dict:
    """The template as a dict (it uses long-form intrinsics only, so safe_load is enough)."""
    with open(path or TEMPLATE_PATH, encoding="utf-8") as f:
        return yaml.load(f, Loader=_YAML_LOADER)  # noqa: S506 - a safe loader (libyaml's SafeLoader)


def _parameter_values(template: dict, given: dict[str, Any] | None) -> dict[str, Any]:
    """Template defaults overlaid with `given`, typed as `Ref` yields them to resource properties."""
    given = {k: str(v) for k, v in (given or {}).items()}
    unknown = set(given) - set(template.get("Parameters", {}))
    if unknown:
        raise ValueError(f"unknown template parameters: {sorted(unknown)}")
    values: dict[str, Any] = {}
    for name, spec in template.get("Parameters", {}).items():
        raw = given.get(name, spec.get("Default"))
        if raw is None:
            raise ValueError(f"template parameter {name!r} has no default and no value")
        raw = str(raw)
        # Checked here too because moto's CloudFormation does not enforce these constraints.
        if "AllowedPattern" in spec and not re.fullmatch(spec["AllowedPattern"], raw):
            raise ValueError(f"parameter {name}={raw!r} does not match {spec['AllowedPattern']}")
        if "AllowedValues" in spec and raw not in [str(v) for v in spec["AllowedValues"]]:
            raise ValueError(f"parameter {name}={raw!r} is not one of {spec['AllowedValues']}")
        if spec["Type"] == "Number":
            # boto3 validates e.g. Expiration.Days as an integer, so keep integral numbers integral.
            number = float(raw)
            values[name] = int(number) if number.is_integer() else number
            if "MinValue" in spec and number < float(spec["MinValue"]):
                raise ValueError(f"parameter {name}={raw} is below {spec['MinValue']}")
            if "MaxValue" in spec and number > float(spec["MaxValue"]):
                raise ValueError(f"parameter {name}={raw} is above {spec['MaxValue']}")
        elif spec["Type"] == "CommaDelimitedList":
            values[name] = [item.strip() for item in raw.split(",")] if raw else []
        else:
            values[name] = raw
    return values


def _param_text(value: Any) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


class Resolver:
    """Resolves the intrinsic functions the template uses, against a deployed (or imagined) stack.

    `physical` maps logical ids to physical ids (what `Ref` on a resource yields); `pseudo` holds
    AWS::AccountId, AWS::Region and friends.
    """

    def __init__(
        self, template: dict, parameters: dict[str, Any], pseudo: dict[str, str], physical: dict[str, str] | None = None
    ):
        self.template = template
        self.parameters = parameters
        self.pseudo = pseudo
        self.physical = physical or {}
        self._conditions: dict[str, bool] = {}

    def condition(self, name: str) -> bool:
        if name not in self._conditions:
            self._conditions[name] = bool(self.resolve(self.template["Conditions"][name]))
        return self._conditions[name]

    def _ref(self, name: str) -> Any:
        if name == "AWS::NoValue":
            return NO_VALUE
        if name in self.parameters:
            return self.parameters[name]
        if name in self.pseudo:
            return self.pseudo[name]
        if name in self.physical:
            return self.physical[name]
        raise ValueError(f"cannot resolve Ref {name!r}")

    def _sub(self, arg: Any) -> str:
        text, variables = (arg, {}) if isinstance(arg, str) else (arg[0], self.resolve(arg[1]))

        def replace(match: re.Match) -> str:
            name = match.group(1)
            if name.startswith("!"):  # ${!Literal} is the escape for a literal ${Literal}
                return "${" + name[1:] + "}"
            if name in variables:
                return str(variables[name])
            if "." in name and not name.startswith("AWS::"):
                raise ValueError(f"Fn::Sub attribute ${{{name}}} is not supported by the local resolver")
            return str(self._ref(name))

        return re.sub(r"\$\{([^}]+)\}", replace, text)

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            items = [self.resolve(v) for v in value]
            return [v for v in items if v is not NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((key, arg),) = value.items()
            if key == "Ref":
                return self._ref(arg)
            if key == "Fn::Sub":
                return self._sub(arg)
            if key == "Fn::Join":
                return str(arg[0]).join(str(v) for v in self.resolve(arg[1]))
            if key == "Fn::Select":
                return self.resolve(arg[1])[int(self.resolve(arg[0]))]
            if key == "Fn::If":
                return self.resolve(arg[1] if self.condition(arg[0]) else arg[2])
            if key == "Fn::Equals":
                left, right = (self.resolve(v) for v in arg)
                return str(left) == str(right)
            if key == "Fn::Not":
                return not self.resolve(arg[0])
            if key == "Fn::And":
                return all(self.resolve(v) for v in arg)
            if key == "Fn::Or":
                return any(self.resolve(v) for v in arg)
            if key == "Condition":
                return self.condition(arg)
            if key.startswith("Fn::"):
                # Fail loudly rather than apply a half-resolved property.
                raise ValueError(f"{key} is not supported by the local resolver")
        resolved = {k: self.resolve(v) for k, v in value.items()}
        return {k: v for k, v in resolved.items() if v is not NO_VALUE}

    def resources(self, resource_type: str) -> list[tuple[str, dict]]:
        """(logical id, resolved properties) of the resources of a type whose Condition holds."""
        found = []
        for logical_id, resource in self.template.get("Resources", {}).items():
            if resource["Type"] != resource_type:
                continue
            if "Condition" in resource and not self.condition(resource["Condition"]):
                continue
            found.append((logical_id, self.resolve(resource.get("Properties", {}))))
        return found


def _partition(region: str) -> str:
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


# --- CloudFormation shapes -> service API shapes ------------------------------------------------------


def lifecycle_rule_to_api(rule: dict) -> dict:
    """A CFN `LifecycleConfiguration.Rules[]` item in `put_bucket_lifecycle_configuration` shape."""
    rule = dict(rule)
    out: dict[str, Any] = {}
    if "Id" in rule:
        out["ID"] = rule.pop("Id")
    out["Status"] = rule.pop("Status")
    prefix = rule.pop("Prefix", "")
    tags = [{"Key": t["Key"], "Value": t["Value"]} for t in rule.pop("TagFilters", [])]
    sizes = {k: rule.pop(k) for k in ("ObjectSizeGreaterThan", "ObjectSizeLessThan") if k in rule}
    if bool(prefix) + len(tags) + len(sizes) > 1:  # S3 wants several conditions wrapped in And
        out["Filter"] = {"And": {**({"Prefix": prefix} if prefix else {}), **({"Tags": tags} if tags else {}), **sizes}}
    elif tags:
        out["Filter"] = {"Tag": tags[0]}
    elif sizes:
        out["Filter"] = sizes
    else:
        out["Filter"] = {"Prefix": prefix}
    expiration = {}
    if "ExpirationInDays" in rule:
        expiration["Days"] = int(rule.pop("ExpirationInDays"))
    if "ExpirationDate" in rule:
        expiration["Date"] = rule.pop("ExpirationDate")
    if "ExpiredObjectDeleteMarker" in rule:
        expiration["ExpiredObjectDeleteMarker"] = bool(rule.pop("ExpiredObjectDeleteMarker"))
    if expiration:
        out["Expiration"] = expiration
    if "AbortIncompleteMultipartUpload" in rule:
        days = rule.pop("AbortIncompleteMultipartUpload")["DaysAfterInitiation"]
        out["AbortIncompleteMultipartUpload"] = {"DaysAfterInitiation": int(days)}
    if "NoncurrentVersionExpirationInDays" in rule:
        out["NoncurrentVersionExpiration"] = {"NoncurrentDays": int(rule.pop("NoncurrentVersionExpirationInDays"))}
    if "NoncurrentVersionExpiration" in rule:
        out["NoncurrentVersionExpiration"] = dict(rule.pop("NoncurrentVersionExpiration"))
    if "Transitions" in rule:
        out["Transitions"] = [
            {
                **({"Days": int(t["TransitionInDays"])} if "TransitionInDays" in t else {}),
                **({"Date": t["TransitionDate"]} if "TransitionDate" in t else {}),
                "StorageClass": t["StorageClass"],
            }
            for t in rule.pop("Transitions")
        ]
    if rule:
        # A property added to the template must not be dropped here without anyone noticing.
        raise ValueError(f"lifecycle rule properties not translated for the local stack: {sorted(rule)}")
    return out


def encryption_to_api(bucket_encryption: dict) -> dict:
    rules = []
    for rule in bucket_encryption["ServerSideEncryptionConfiguration"]:
        default = dict(rule["ServerSideEncryptionByDefault"])
        if "KMSMasterKeyID" in default:
            default["KMSMasterKeyID"] = str(default["KMSMasterKeyID"])
        api_rule: dict[str, Any] = {"ApplyServerSideEncryptionByDefault": default}
        if "BucketKeyEnabled" in rule:
            api_rule["BucketKeyEnabled"] = bool(rule["BucketKeyEnabled"])
        rules.append(api_rule)
    return {"Rules": rules}


def template_lifecycle_rules(retention_days: int = 30, template: dict | None = None) -> list[dict]:
    """The recordings bucket's lifecycle rules in S3 API shape, as the template defines them."""
    template = template or load_template()
    resolver = Resolver(
        template,
        _parameter_values(template, {"RetentionDays": retention_days}),
        _pseudo_parameters("000000000000", "us-east-1", "callbridge-test"),
    )
    buckets = [props for _, props in resolver.resources("AWS::S3::Bucket") if "LifecycleConfiguration" in props]
    if len(buckets) != 1:
        raise ValueError(f"expected one bucket with a lifecycle configuration, found {len(buckets)}")
    return [lifecycle_rule_to_api(r) for r in buckets[0]["LifecycleConfiguration"]["Rules"]]


# --- deploy -----------------------------------------------------------------------------------------


def _pseudo_parameters(account_id: str, region: str, stack_name: str, stack_id: str = "") -> dict[str, str]:
    return {
        "AWS::AccountId": account_id,
        "AWS::Region": region,
        "AWS::Partition": _partition(region),
        "AWS::URLSuffix": "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com",
        "AWS::StackName": stack_name,
        "AWS::StackId": stack_id,
        "AWS::NotificationARNs": [],
    }


def _session(endpoint_url: str | None, region: str):
    import boto3

    session = boto3.session.Session(region_name=region)
    if endpoint_url and session.get_credentials() is None:
        # moto accepts any credentials; a fresh laptop has none configured.
        session = boto3.session.Session(
            region_name=region, aws_access_key_id="testing", aws_secret_access_key="testing"
        )
    return session


def _describe(cfn, stack_name: str) -> dict | None:
    from botocore.exceptions import ClientError

    try:
        stacks = cfn.describe_stacks(StackName=stack_name)["Stacks"]
    except ClientError as e:
        if "does not exist" in str(e):
            return None
        raise
    return stacks[0] if stacks and stacks[0]["StackStatus"] != "DELETE_COMPLETE" else None


def _wait(cfn, stack_name: str, timeout: float = 900.0) -> dict | None:
    """Poll until the stack leaves *_IN_PROGRESS (moto finishes at once; real AWS takes minutes)."""
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        stack = _describe(cfn, stack_name)
        if stack is None or not stack["StackStatus"].endswith("_IN_PROGRESS"):
            return stack
        if time.monotonic() > deadline:
            raise TimeoutError(f"stack {stack_name} still {stack['StackStatus']} after {timeout:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def _create_or_update(cfn, stack_name: str, body: str, params: list[dict]) -> dict:
    from botocore.exceptions import ClientError

    stack = _wait(cfn, stack_name)
    if stack is not None and stack["StackStatus"] in _RECREATE:
        cfn.delete_stack(StackName=stack_name)
        stack = _wait(cfn, stack_name)
    ok = {"CREATE_COMPLETE", "UPDATE_COMPLETE"}
    if stack is None:
        cfn.create_stack(StackName=stack_name, TemplateBody=body, Parameters=params)
    else:
        # An earlier update that rolled back left a usable stack; an update made now must succeed.
        ok.add("UPDATE_ROLLBACK_COMPLETE")
        current_params = {p["ParameterKey"]: p.get("ParameterValue") for p in stack.get("Parameters", [])}
        current_body = cfn.get_template(StackName=stack_name).get("TemplateBody")
        wanted_params = {p["ParameterKey"]: p["ParameterValue"] for p in params}
        if current_body != body or any(current_params.get(k) != v for k, v in wanted_params.items()):
            try:
                cfn.update_stack(StackName=stack_name, TemplateBody=body, Parameters=params)
                ok.discard("UPDATE_ROLLBACK_COMPLETE")
            except ClientError as e:
                if "No updates are to be performed" not in str(e):
                    raise
    stack = _wait(cfn, stack_name)
    if stack is None or stack["StackStatus"] not in ok:
        status = stack["StackStatus"] if stack else "gone"
        raise RuntimeError(f"stack {stack_name} ended in {status}: {stack and stack.get('StackStatusReason')}")
    return stack


def _apply_dropped_properties(session, endpoint_url: str | None, resolver: Resolver) -> None:
    """Apply what moto's CloudFormation ignores. Every call is a PUT of the template's value: idempotent."""
    s3 = session.client("s3", endpoint_url=endpoint_url)
    for _, props in resolver.resources("AWS::S3::Bucket"):
        bucket = props["BucketName"]
        if "BucketEncryption" in props:
            s3.put_bucket_encryption(
                Bucket=bucket, ServerSideEncryptionConfiguration=encryption_to_api(props["BucketEncryption"])
            )
        if "PublicAccessBlockConfiguration" in props:
            block = {k: bool(v) for k, v in props["PublicAccessBlockConfiguration"].items()}
            s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration=block)
        if "OwnershipControls" in props:
            s3.put_bucket_ownership_controls(
                Bucket=bucket,
                OwnershipControls={
                    "Rules": [{"ObjectOwnership": r["ObjectOwnership"]} for r in props["OwnershipControls"]["Rules"]]
                },
            )
        if "LifecycleConfiguration" in props:
            rules = [lifecycle_rule_to_api(r) for r in props["LifecycleConfiguration"]["Rules"]]
            s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": rules})
    # The template's bucket policy (deny non-TLS access) is NOT applied locally: moto evaluates a Deny
    # statement without its aws:SecureTransport condition, so it would refuse every object request.

    dynamodb = session.client("dynamodb", endpoint_url=endpoint_url)
    for _, props in resolver.resources("AWS::DynamoDB::Table"):
        table = props["TableName"]
        ttl = props.get("TimeToLiveSpecification")
        if ttl:
            current = dynamodb.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
            enabled = current.get("TimeToLiveStatus") in ("ENABLED", "ENABLING")
            # Real DynamoDB rejects re-enabling TTL that is already on; only change what differs.
            if (
                enabled != bool(ttl["Enabled"])
                or current.get("AttributeName", ttl["AttributeName"]) != ttl["AttributeName"]
            ):
                dynamodb.update_time_to_live(
                    TableName=table,
                    TimeToLiveSpecification={"AttributeName": ttl["AttributeName"], "Enabled": bool(ttl["Enabled"])},
                )
        pitr = props.get("PointInTimeRecoverySpecification")
        if pitr:
            dynamodb.update_continuous_backups(
                TableName=table,
                PointInTimeRecoverySpecification={
                    "PointInTimeRecoveryEnabled": bool(pitr["PointInTimeRecoveryEnabled"])
                },
            )

    sns = session.client("sns", endpoint_url=endpoint_url)
    for _, props in resolver.resources("AWS::SNS::Subscription"):
        topic = props["TopicArn"]
        existing = sns.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]
        if not any(s["Protocol"] == props["Protocol"] and s["Endpoint"] == props["Endpoint"] for s in existing):
            sns.subscribe(TopicArn=topic, Protocol=props["Protocol"], Endpoint=props["Endpoint"])


def deploy(
    endpoint_url: str | None = None, stage: str = "local", parameters: dict | None = None, region: str = "us-east-1"
) -> dict[str, str]:
    """Create (or reuse, updating it if the template or parameters changed) the stack `callbridge-{stage}`.

    `endpoint_url` None uses whatever boto3 is configured with (AWS_ENDPOINT_URL, an in-process
    `moto.mock_aws`). Returns the app's environment derived from the stack outputs.
    """
    template_text = TEMPLATE_PATH.read_text(encoding="utf-8")
    template = yaml.load(template_text, Loader=_YAML_LOADER)  # noqa: S506 - a safe loader
    stack_name = f"callbridge-{stage}"
    values = _parameter_values(template, {**(parameters or {}), "Stage": stage})  # validate before creating
    # Every parameter is passed explicitly, so the stack holds exactly the values resolved below.
    cfn_params = [{"ParameterKey": k, "ParameterValue": _param_text(v)} for k, v in values.items()]

    session = _session(endpoint_url, region)
    cfn = session.client("cloudformation", endpoint_url=endpoint_url)
    stack = _create_or_update(cfn, stack_name, template_text, cfn_params)

    physical = {
        r["LogicalResourceId"]: r["PhysicalResourceId"]
        for r in cfn.describe_stack_resources(StackName=stack_name)["StackResources"]
        if r.get("LogicalResourceId") and r.get("PhysicalResourceId")  # moto lists unsupported ones bare
    }
    account = session.client("sts", endpoint_url=endpoint_url).get_caller_identity()["Account"]
    resolver = Resolver(template, values, _pseudo_parameters(account, region, stack_name, stack["StackId"]), physical)
    _apply_dropped_properties(session, endpoint_url, resolver)

    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
    missing = set(OUTPUT_ENV) - set(outputs)
    if missing:
        raise RuntimeError(f"stack {stack_name} lacks outputs {sorted(missing)}")
    env = {"CALLBRIDGE_STAGE": stage}
    env.update({var: outputs[key] for key, var in OUTPUT_ENV.items()})
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"), help="moto server URL (default: AWS_ENDPOINT_URL)"
    )
    parser.add_argument("--stage", default="local")
    parser.add_argument("--region", default=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    parser.add_argument(
        "--parameter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="template parameter, e.g. RetentionDays=7 (repeatable)",
    )
    args = parser.parse_args(argv)
    params = {}
    for item in args.parameter:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--parameter expects KEY=VALUE, got {item!r}")
        params[key] = value
    env = deploy(endpoint_url=args.endpoint_url, stage=args.stage, parameters=params, region=args.region)
    for key, value in env.items():
        print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
