"""`make run` takes a burst and runs on one configuration document (issue 9 item 7, issue 12 item 8).

- 100 Tilda posts at once, each on its own connection, all get an answer (chalice local's listen backlog
  of 5 reset connections beyond about 15);
- CALLBRIDGE_CONFIG names a document other than config/local.yaml: the app (inside `chalice local`, where
  the stage's variables in .chalice/config.json used to win), the intake worker and the dialer all use it;
- a document that fails validation stops `make run` before anything starts, naming the key.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests
import yaml

from tests.test_e2e_local_stack import CONFTEST_KEYS, make_run, wait_until

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
ONLY_HERE = "form-only-in-this-document"


def _document(tmp_path: Path) -> Path:
    """config/local.yaml, but offer 102 is fed by a form only this document knows and calls at once."""
    doc = yaml.safe_load((ROOT / "config" / "local.yaml").read_text(encoding="utf-8"))
    offer = next(o for o in doc["offers"] if o["id"] == 102)
    offer["tilda_form_ids"] = [*offer["tilda_form_ids"], ONLY_HERE]
    offer["callback_delay_seconds"] = 0  # config/local.yaml: 120 s, and its default offer 101: 300 s
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    local = tmp_path_factory.mktemp("burst")
    # CALLBACK_DELAY_SECONDS unset (empty): the offers' own delays apply, so the document decides when a call goes.
    with make_run(local, FRESH="1", CALLBRIDGE_CONFIG=str(_document(local)), CALLBACK_DELAY_SECONDS="") as running:
        yield running


def _post(app: str, phone: str, formid: str, tranid: str) -> requests.Response:
    body = urlencode({"Name": "Burst", "Phone": phone, "formid": formid, "tranid": tranid})
    return requests.post(app + "/webhooks/tilda", data=body, timeout=60,
                         headers={"Content-Type": "application/x-www-form-urlencoded", "X-Api-Key": "local-tilda-key",
                                  "Connection": "close"})


def test_a_hundred_concurrent_tilda_posts_all_get_an_answer(stack):
    start = threading.Barrier(100)
    answers: list[int | str] = []

    def post(i: int) -> None:
        start.wait()
        try:
            answers.append(_post(stack["app"], f"+7999222{i:04d}", "form493249737", f"burst:{i}").status_code)
        except requests.RequestException as exc:  # a reset connection: what the small backlog did
            answers.append(type(exc).__name__)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(answers, key=str) == [200] * 100


def test_the_app_and_the_workers_use_the_document_of_the_run(stack):
    assert any("configuration:" in line and "other.yaml" in line for line in stack["lines"])
    phone10 = "9993334455"
    response = _post(stack["app"], "+7" + phone10, ONLY_HERE, f"doc:{time.time_ns()}")
    assert response.status_code == 200, response.text
    # Offer 102 of this document calls at once; under config/local.yaml the form would feed the default offer 101,
    # whose callback waits 300 s (and offer 102's own 120 s): the originate proves app, intake worker and dialer
    # all read this document.
    calls = wait_until(lambda: [c for c in requests.get(stack["pbx"] + "/_sandbox/calls", timeout=10).json()
                                if c["phone"] == phone10], 90, "the originate of the lead")
    assert calls[0]["extension"] == "202"  # offer 102's operator


def test_a_document_that_fails_validation_stops_make_run_naming_the_key(tmp_path):
    doc = yaml.safe_load((ROOT / "config" / "local.yaml").read_text(encoding="utf-8"))
    doc["offers"][0]["callback_delay_seconds"] = -5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in CONFTEST_KEYS}
    env.update(CALLBRIDGE_CONFIG=str(bad), CALLBRIDGE_LOCAL_DIR=str(tmp_path / "local"), MOTO_PORT="1")
    proc = subprocess.run([sys.executable, "-m", "infra.local.run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    assert "offers.0.callback_delay_seconds" in proc.stderr
    assert "ready" not in proc.stdout and "moto server" not in proc.stdout  # nothing was started
    assert not (tmp_path / "local").exists()
