"""Logging and metrics through Powertools: JSON logs with every phone number masked (R-9), EMF metrics.

Metrics are buffered per handler invocation and flushed once when it ends (`invocation_context`): one EMF
document per dimension set instead of one print per metric. Outside an invocation (a CLI, a test calling
code directly) a metric is written at once. Every metric carries the dimension `stage`; Powertools'
`service` dimension is left out (the namespace already says callbridge), so the alarms of
infra/template.yaml name exact dimension sets.
"""

from __future__ import annotations

import contextvars
import functools
import gc
import os
import sys
import threading

from aws_lambda_powertools import Logger
from aws_lambda_powertools.logging.formatter import LambdaPowertoolsFormatter

from functions.core.phones import redact

SERVICE = "callbridge"
NAMESPACE = "callbridge"

# Cold start, in Lambda: a container's first invocation imports its handler's modules (boto3, pydantic, the
# configuration's models): over a million objects that live as long as the process. At the default GC
# schedule the collector ran ~160 times over them in one Tilda cold start (~120 ms, a tenth of its CPU) and found
# next to nothing to free. So the cyclic GC is paused from here to the end of that first invocation; then
# everything alive is frozen (gc.freeze: never scanned again, as for a preloading server's parent process) and
# the GC resumes on the interpreter's own schedule. Reference counting frees everything else meanwhile.
# Outside Lambda (tests, the local stack, CLIs) nothing changes.
_COLD_GC_PAUSED = bool(os.environ.get("AWS_LAMBDA_FUNCTION_NAME")) and gc.isenabled()
if _COLD_GC_PAUSED:
    gc.disable()


class PhoneMaskingFormatter(LambdaPowertoolsFormatter):
    """Masks phone numbers in the finished JSON line, whatever field or exception text holds them.

    Code logs masked phones on purpose; this is the net under it, so a phone inside an exception
    message, a provider's error body or a stray `extra=` never reaches CloudWatch in full.
    """

    def serialize(self, log: dict) -> str:
        return redact(super().serialize(log))


logger = Logger(
    service=os.environ.get("POWERTOOLS_SERVICE_NAME", SERVICE),
    logger_formatter=PhoneMaskingFormatter(),
)


_CONTEXT_KEYS = ("cold_start", "function_name", "function_memory_size", "function_arn", "function_request_id")
_warm: set[str] = set()
_warm_lock = threading.Lock()


def invocation_context(handler):
    """Like `logger.inject_lambda_context`, but the invocation's keys belong to the calling thread.

    Powertools' `append_keys` writes one dict shared by every thread: where several invocations run at once
    in one process (the local runner's threads, `chalice local`'s request threads) a line of one handler
    carried another's function name. `thread_safe_append_keys` keeps them in a context variable of the thread,
    and they are removed when the invocation ends. Cold start is counted per function, as each Lambda
    function has its own containers.
    """

    @functools.wraps(handler)
    def wrapper(event, context, *args, **kwargs):
        name = getattr(context, "function_name", None)
        with _warm_lock:
            cold = name not in _warm
            _warm.add(name)
        logger.thread_safe_append_keys(
            cold_start=cold, function_name=name,
            function_memory_size=getattr(context, "memory_limit_in_mb", None),
            function_arn=getattr(context, "invoked_function_arn", None),
            function_request_id=getattr(context, "aws_request_id", None))
        token = _metrics.set({}) if _metrics.get() is None else None  # an inner invocation shares the outer's
        try:
            return handler(event, context, *args, **kwargs)
        except Exception as exc:
            if is_config_error(exc):
                report_config_error(exc, name)
            raise
        finally:
            if token is not None:
                flush_metrics(_metrics.get())
                _metrics.reset(token)
            logger.thread_safe_remove_keys(_CONTEXT_KEYS)
            _end_cold_gc_pause()

    return wrapper


def _end_cold_gc_pause() -> None:
    global _COLD_GC_PAUSED
    if _COLD_GC_PAUSED:
        _COLD_GC_PAUSED = False
        gc.freeze()
        gc.enable()


# The metrics of the running invocation, by dimension set (None: not inside one, so write at once). A context
# variable, not a global: the local runner and `chalice local` run several invocations at once in threads.
_metrics: contextvars.ContextVar[dict | None] = contextvars.ContextVar("callbridge_metrics", default=None)


def metric(name: str, value: float = 1, unit: str = "Count", **dimensions: str) -> None:
    """Record one EMF metric (no decorator needed, so it works in routes and workers alike); flushed when the
    invocation ends, or at once outside one."""
    from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit  # deferred: not on every path

    dims = {"stage": os.environ.get("CALLBRIDGE_STAGE", "dev"), **{k: str(v) for k, v in dimensions.items()}}
    buffer = _metrics.get()
    key = tuple(dims.items())
    metrics = buffer.get(key) if buffer is not None else None
    if metrics is None:
        metrics = EphemeralMetrics(namespace=NAMESPACE, service="")  # "": no `service` dimension
        for dim_name, dim_value in dims.items():
            metrics.add_dimension(name=dim_name, value=dim_value)
        if buffer is not None:
            buffer[key] = metrics
    metrics.add_metric(name=name, unit=getattr(MetricUnit, unit), value=value)
    if buffer is None:
        flush_metrics({key: metrics})


def flush_metrics(buffer: dict | None) -> None:
    """Print the buffered EMF documents; a failure here never fails the invocation's work."""
    for metrics in (buffer or {}).values():
        try:
            metrics.flush_metrics()
        except Exception as exc:  # noqa: BLE001 - a bad metric must not turn a handled message into a retry
            logger.warning("metrics not flushed", extra={"error": str(exc)})
    if buffer:
        buffer.clear()


def is_config_error(exc: BaseException) -> bool:
    # Looked up, not imported: the configuration module (pydantic, yaml) stays off paths that never load it,
    # and one that was never imported cannot have raised.
    config = sys.modules.get("functions.core.config")
    return config is not None and isinstance(exc, config.ConfigError)


def report_config_error(exc: BaseException, where: str | None) -> None:
    """A broken configuration reached a handler: a loud log line naming the key and the ConfigErrors metric
    (its alarm fires at once). Once per exception, however many layers see it."""
    if getattr(exc, "_callbridge_reported", False):
        return
    try:
        exc._callbridge_reported = True  # type: ignore[attr-defined]
    except AttributeError:
        pass
    logger.error("configuration error: fix the configuration document (CALLBRIDGE_CONFIG) and deploy; "
                 "work waits and is retried", extra={"where": where, "error": str(exc)})
    metric("ConfigErrors")
