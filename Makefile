# callbridge: the two set-up commands are `make run` and `make test`; both install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAGE ?= dev
QUEUE ?= intake
export AWS_DEFAULT_REGION ?= us-east-1

.PHONY: install run demo test lint unit e2e cfn-lint browser bench package deploy destroy replay-dlq doctor clean

# The virtual environment is rebuilt when the pinned requirements change.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

## The whole system locally: moto server, AWS resources from infra/template.yaml, sandboxes, app, runner.
## Its state survives a restart (build/local/); make run FRESH=1 starts empty.
run: install
	$(PY) -m infra.local.run $(if $(filter-out 0,$(FRESH)),--fresh)

## A sample lead through the running local stack, with its timeline (start `make run` first).
demo: install
	$(PY) -m infra.local.demo

## Every test: lint, unit and integration tests, the end-to-end test of `make run`, cfn-lint.
test: install lint cfn-lint browser
	$(PY) -m pytest -n 2 --dist loadfile

## Debian's chromium for the dashboard's browser test (Playwright drives it; it downloads no browser of its own).
## Installed with apt-get when missing and root (CI); otherwise tests/test_dashboard_browser.py skips, saying why.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium (apt-get) for tests/test_dashboard_browser.py"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else echo "chromium not found and not root: tests/test_dashboard_browser.py will skip (apt-get install chromium)"; fi

lint: install
	$(VENV)/bin/ruff check .

cfn-lint: install
	$(VENV)/bin/cfn-lint infra/template.yaml

## Fast loop while developing: everything but the end-to-end test.
unit: install
	$(PY) -m pytest -n 2 --dist loadfile -m "not e2e"

e2e: install
	$(PY) -m pytest -m e2e

## Benchmarks of issue 9 side by side (about 11 min): a burst of LEADS leads in 60 s and a steady run on the local stack, requests and
## AWS cost per lead, cold starts against a minimal app, package size; table printed, JSON in build/bench/.
LEADS ?= 1000
bench: install
	$(PY) -m bench.run --leads $(LEADS)

## The Lambda package of a stage, into build/<stage>/ (functions/ ships through vendor/functions), checked to be
## wired to that stage's queues and names, each function with its own role and policy.
package: install
	$(PY) -m infra.deploy package --stage $(STAGE) --out build/$(STAGE)

## One-command deploy to the AWS account of your credentials: make deploy STAGE=prod (README "Deploying").
deploy: install
	$(PY) -m infra.deploy deploy --stage $(STAGE)

## Remove a deployed stage: make destroy STAGE=dev [DELETE_BUCKET=1] [YES=1]
destroy: install
	$(PY) -m infra.deploy destroy --stage $(STAGE) $(if $(DELETE_BUCKET),--delete-bucket) $(if $(YES),--yes)

## Check a stage's set-up (providers, AWS, secrets): make doctor [STAGE=local|dev|prod] [TEST_CALL=+79...] [OFFER=id]
doctor: install
	$(PY) -m functions.insight.doctor --stage $(STAGE) $(if $(TEST_CALL),--test-call $(TEST_CALL)) $(if $(OFFER),--offer $(OFFER))

## Re-drive a dead-letter queue: make replay-dlq QUEUE=intake [STAGE=local|dev|prod] [DRY_RUN=1] [MAX=N]
replay-dlq: install
	$(PY) -m functions.core.replay_dlq $(QUEUE) --stage $(STAGE) $(if $(DRY_RUN),--dry-run) $(if $(MAX),--max $(MAX))

clean:
	rm -rf $(VENV) build .chalice/deployments .pytest_cache .ruff_cache
