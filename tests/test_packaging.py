"""`chalice package` really ships functions/ and the configuration, and not boto3 (SPEC §2); the packaging step
(infra.deploy.package) byte-compiles every module for the runtime with unchecked hashes (issue 9 item 6)."""

from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path

import pytest

from infra import deploy
from infra.local.stack import OUTPUT_ENV

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    out = tmp_path_factory.mktemp("package") / "out"
    # Without the resource names other tests' stacks left in this process's environment (INTAKE_QUEUE=...):
    # the decorators would bake those in.
    env = {k: v for k, v in os.environ.items() if k not in OUTPUT_ENV.values()}
    env.update(CALLBRIDGE_STAGE="dev", CALLBRIDGE_CONFIG="config/dev.yaml", AWS_DEFAULT_REGION="us-east-1")
    sam = deploy.package(ROOT, "dev", env, out)  # `chalice package`, then the compile step of every deploy
    with zipfile.ZipFile(out / "deployment.zip") as zf:
        names = set(zf.namelist())
        _ZIP_NAMES[:] = zf.namelist()
        _ZIP_BYTES.update((n, zf.read(n)) for n in names if n.endswith((".py", ".pyc")))
    return names, sam


_ZIP_BYTES: dict[str, bytes] = {}
_ZIP_NAMES: list[str] = []


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


def _pyc_of(source: str) -> str:
    folder, _, name = source.rpartition("/")
    tag = importlib.util.cache_from_source(name).rpartition("/")[2]  # e.g. tilda_webhook.cpython-311.pyc
    return f"{folder}/__pycache__/{tag}" if folder else f"__pycache__/{tag}"


def test_every_module_ships_compiled_for_the_runtime_with_an_unchecked_hash(package):
    # Our code ships as sources with __pycache__ .pyc; third-party modules as sourceless x.pyc in place of x.py
    # (infra/lambda_package.py; tests/test_lambda_package.py runs the result).
    names, sam = package
    runtime = sam["Resources"]["IntakeWorker"]["Properties"]["Runtime"]
    assert runtime == "python3.11"
    sources = sorted(n for n in names if n.endswith(".py"))
    assert {"app.py", "functions/intake/tilda_webhook.py"} <= set(sources)
    assert not [s for s in sources if _pyc_of(s) not in names]
    assert {"pydantic/main.pyc", "phonenumbers/phonenumberutil.pyc",
            "aws_lambda_powertools/logging/logger.pyc"} <= names
    for source in ("app.py", "functions/core/config.py"):
        pyc = _ZIP_BYTES[_pyc_of(source)]
        assert pyc[:4] == importlib.util.MAGIC_NUMBER  # built by the runtime's Python (this venv is 3.11)
        flags = int.from_bytes(pyc[4:8], "little")
        assert flags == 0b01, f"{source}: flags {flags:#b}, expected hash-based and unchecked"
        assert pyc[8:16] == importlib.util.source_hash(_ZIP_BYTES[source])  # of the very source shipped


def test_no_stale_pycache_from_the_source_tree_reaches_the_package(package):
    # vendor/functions follows functions/, whose __pycache__ holds timestamp-checked .pyc files of whatever
    # Python ran the tests last, against other sources: only the packaging step's own may ship, once each.
    names = [n for n in _ZIP_NAMES if n.endswith(".pyc")]
    assert len(names) == len(set(names)), "a .pyc is in the zip twice"
    assert not [n for n in names if "__pycache__/" in n and not n.startswith(("functions/", "__pycache__/app."))]
    stale = [n for n in names if int.from_bytes(_ZIP_BYTES[n][4:8], "little") != 0b01]
    assert not stale, stale[:5]
