"""callbridge: every Chalice decorator lives here, each a thin wrapper around code in functions/.

Handlers import their modules on first call: each Lambda (the API and every worker) pays at cold
start only for the code it runs. Queue names come from functions.core.resources, so the decorators, the
CloudFormation template and the local stack agree.
"""

from chalice import Chalice, ConvertToMiddleware, Rate, Response

from functions.core import resources
from functions.core.observability import invocation_context

app = Chalice(app_name="callbridge")
app.register_middleware(ConvertToMiddleware(invocation_context))


# --- ops (issue 12 item 8): an invalid configuration answers 503 naming the key, and alarms; never a bare 500 ---
# Chalice turns a view's exception into a 500 before any middleware sees it, so each view is wrapped, once,
# at the end of this file (when every route is registered). Workers: functions/core/queues.py.
def _config_guarded(view):
    def guarded(*args, **kwargs):
        try:
            return view(*args, **kwargs)
        except Exception as exc:
            from functions.core import observability

            if not observability.is_config_error(exc):
                raise
            observability.report_config_error(exc, "api")
            return Response(status_code=503, headers={"Retry-After": "300"},
                            body={"error": f"callbridge is misconfigured, try again later: {exc}", "field": "config"})

    return guarded


FORM_TYPES = ["application/x-www-form-urlencoded", "application/json", "text/plain", "multipart/form-data"]


def _reply(reply) -> Response:
    headers = dict(reply.headers)
    if isinstance(reply.body, str):
        return Response(body=reply.body, status_code=reply.status, headers={"Content-Type": "text/plain", **headers})
    return Response(body=reply.body, status_code=reply.status, headers=headers)


def _headers(request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items()}


@app.route("/v1/health", methods=["GET"])
def health():
    return {"ok": True, "service": "callbridge", "stage": resources.stage()}


@app.route("/webhooks/tilda", methods=["POST"], content_types=FORM_TYPES)
def tilda_webhook():
    from functions.intake import tilda_webhook as webhook

    request = app.current_request
    return _reply(
        webhook.receive_tilda(
            request.raw_body,
            request.headers.get("content-type"),
            _headers(request),
            dict(request.query_params or {}),
        )
    )


@app.route("/v1/calls", methods=["POST"], content_types=["application/json"])
def create_call():
    from functions.calling import manual_calls

    request = app.current_request
    return _reply(manual_calls.create(request.raw_body, _headers(request)))


@app.route("/v1/calls/{call_id}", methods=["GET"])
def read_call(call_id):
    from functions.calling import manual_calls

    return _reply(manual_calls.read(call_id, _headers(app.current_request)))


# No application/octet-stream: Chalice refuses to deploy a route mixing binary and text content types.
@app.route("/webhooks/beeline/{secret}", methods=["POST"], content_types=["application/xml", "text/xml"])
def beeline_webhook(secret):
    from functions.tracking import beeline_webhook as webhook

    request = app.current_request
    source_ip = ((request.context or {}).get("identity") or {}).get("sourceIp")
    return _reply(webhook.receive(secret, request.raw_body, source_ip))


@app.route("/v1/recordings/{call_id}", methods=["GET"])
def recording_link(call_id):
    from functions.postcall import recording_links

    request = app.current_request
    return _reply(recording_links.redirect(call_id, dict(request.query_params or {}), _headers(request)))


# --- reports (insight/reports.py): ad spend, the summary against the seed's targets, the last calls ---
@app.route("/v1/adspend", methods=["PUT"], content_types=["application/json"])
def put_adspend():
    from functions.insight import reports

    request = app.current_request
    return _reply(reports.put_adspend(request.raw_body, _headers(request)))


@app.route("/v1/reports/summary", methods=["GET"])
def report_summary():
    from functions.insight import reports

    request = app.current_request
    return _reply(reports.summary_reply(dict(request.query_params or {}), _headers(request)))


@app.route("/v1/reports/calls", methods=["GET"])
def report_calls():
    from functions.insight import reports

    request = app.current_request
    return _reply(reports.calls_reply(dict(request.query_params or {}), _headers(request)))


# --- crm-webhooks (crm/order_webhook.py, crm/postbacks.py): SalesRender's order triggers, postbacks ---
@app.route("/webhooks/salesrender/{secret}", methods=["POST"], content_types=["application/json", "text/plain"])
def salesrender_webhook(secret):
    from functions.crm import order_webhook

    request = app.current_request
    return _reply(order_webhook.receive(secret, request.raw_body, _headers(request)))


@app.route("/v1/postbacks", methods=["GET"])
def list_postbacks():
    from functions.crm import postbacks

    request = app.current_request
    return _reply(postbacks.listing(dict(request.query_params or {}), _headers(request)))


# --- dashboard (insight/dashboard.py): the page, its data, its script and style sheet ---

@app.route("/dashboard", methods=["GET"])
def dashboard_page():
    from functions.insight import dashboard

    request = app.current_request
    path = (request.context or {}).get("path") or "/dashboard"
    return _reply(dashboard.page(dict(request.query_params or {}), _headers(request), path))


@app.route("/dashboard/data", methods=["GET"])
def dashboard_data():
    from functions.insight import dashboard

    request = app.current_request
    return _reply(dashboard.data(dict(request.query_params or {}), _headers(request)))


@app.route("/dashboard/assets/{name}", methods=["GET"])
def dashboard_asset(name):
    from functions.insight import dashboard

    return _reply(dashboard.asset(name))


# --- crm-plugin (crm/plugin.py): the SalesRender PBX plugin of class WEBHOOK, the "Call" button ---

PLUGIN_TYPES = ["application/x-www-form-urlencoded", "application/json"]


@app.route("/salesrender-plugin/info", methods=["GET"])
def salesrender_plugin_info():
    from functions.crm import plugin

    return _reply(plugin.info())


@app.route("/salesrender-plugin/registration", methods=["PUT"], content_types=PLUGIN_TYPES)
def salesrender_plugin_registration():
    from functions.crm import plugin

    request = app.current_request
    return _reply(plugin.register(request.raw_body, request.headers.get("content-type"),
                                  dict(request.query_params or {})))


@app.route("/salesrender-plugin/special/call", methods=["POST"], content_types=PLUGIN_TYPES)
def salesrender_plugin_call():
    from functions.crm import plugin

    request = app.current_request
    return _reply(plugin.special_call(request.raw_body, request.headers.get("content-type"),
                                      dict(request.query_params or {})))


@app.on_sqs_message(queue=resources.queue_name("intake"), batch_size=1)
def intake_worker(event):
    from functions.core import queues
    from functions.intake import order_worker

    for record in event:
        queues.run("intake", record, lambda body: order_worker.process(body, event.context))


@app.on_sqs_message(queue=resources.queue_name("callbacks"), batch_size=1,
                    maximum_concurrency=resources.max_concurrency("callbacks"))
def callback_worker(event):
    from functions.calling import dialer
    from functions.core import queues

    for record in event:
        queues.run("callbacks", record, dialer.process)


@app.on_sqs_message(queue=resources.queue_name("recordings"), batch_size=1)
def recording_worker(event):
    from functions.core import queues
    from functions.postcall import recorder

    for record in event:
        queues.run("recordings", record, recorder.process)


@app.schedule(Rate(5, unit=Rate.MINUTES))
def subscription_keeper(event):
    from functions.tracking import subscriptions

    subscriptions.keep()


@app.schedule(Rate(5, unit=Rate.MINUTES))
def call_reconciler(event):
    from functions.tracking import reconciler

    reconciler.reconcile()


# --- dispatch (calling/dispatch.py): the safety net of the waiting list; releases dispatch at once ---
@app.schedule(Rate(1, unit=Rate.MINUTES))
def dispatch_sweeper(event):
    from functions.calling import dispatch

    dispatch.sweep()


@app.on_sqs_message(queue=resources.queue_name("postbacks"), batch_size=1)
def postback_worker(event):
    from functions.core import queues
    from functions.crm import postbacks

    for record in event:
        queues.run("postbacks", record, postbacks.process)


@app.on_sqs_message(queue=resources.queue_name("cdrs"), batch_size=1)
def cdr_worker(event):
    from functions.core import queues
    from functions.crm import cdr

    for record in event:
        queues.run("cdrs", record, cdr.process)


for _entry in (e for methods in app.routes.values() for e in methods.values()):
    _entry.view_function = _config_guarded(_entry.view_function)
