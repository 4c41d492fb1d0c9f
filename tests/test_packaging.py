"""`chalice package` really ships functions/ and the configuration, and not boto3 (SPEC §2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    out = tmp_path_factory.mktemp("package")
    shutil.rmtree(ROOT / ".chalice" / "deployments", ignore_errors=True)  # Chalice caches old zips there
    env = {**os.environ, "CALLBRIDGE_STAGE": "dev", "CALLBRIDGE_CONFIG": "config/dev.yaml",
           "AWS_DEFAULT_REGION": "us-east-1"}
    # sys.exit(main()): chalice.cli.main returns its exit status, so a bare main() always exits 0.
    subprocess.run([sys.executable, "-c", "import sys; from chalice.cli import main; sys.exit(main())", "package",
                    "--stage", "dev",
                    str(out)], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    with zipfile.ZipFile(out / "deployment.zip") as zf:
        names = set(zf.namelist())
    return names, json.loads((out / "sam.json").read_text())


def test_every_runtime_module_and_the_stage_config_are_in_the_zip(package):
    names, _ = package
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "functions").rglob("*.py")}
    assert modules, "functions/ has no modules?"
    assert modules <= names, f"missing from the package: {sorted(modules - names)}"
    assert {"app.py", "config/dev.yaml"} <= names


def test_the_package_leaves_out_boto3_tests_and_the_local_stack(package):
    names, _ = package
    tops = {n.split("/")[0] for n in names}
    assert not {"boto3", "botocore", "tests", "infra", "moto"} & tops
    assert {"aws_lambda_powertools", "requests", "phonenumbers", "yaml", "pydantic"} <= tops


def test_intake_worker_reads_its_stage_queue_one_message_at_a_time(package):
    _, sam = package
    worker = sam["Resources"]["IntakeWorker"]["Properties"]
    [event] = worker["Events"].values()
    assert event["Properties"]["Queue"]["Fn::Sub"].endswith(":callbridge-dev-intake")
    assert event["Properties"]["BatchSize"] == 1
    assert worker["Timeout"] == 60


def test_callbacks_read_one_dialer_per_channel_and_slow_schedules_have_time(package):
    _, sam = package
    [event] = sam["Resources"]["CallbackWorker"]["Properties"]["Events"].values()
    assert event["Properties"]["ScalingConfig"] == {"MaximumConcurrency": 5}  # config/dev.yaml channel_limit
    assert sam["Resources"]["SubscriptionKeeper"]["Properties"]["Timeout"] == 180
    assert sam["Resources"]["CallReconciler"]["Properties"]["Timeout"] == 120
