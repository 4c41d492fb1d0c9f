"""Logging and metrics through Powertools: JSON logs with every phone number masked (R-9), EMF metrics."""

from __future__ import annotations

import functools
import os
import threading

from aws_lambda_powertools import Logger
from aws_lambda_powertools.logging.formatter import LambdaPowertoolsFormatter

from functions.core.phones import redact

SERVICE = "callbridge"
NAMESPACE = "callbridge"


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
        try:
            return handler(event, context, *args, **kwargs)
        finally:
            logger.thread_safe_remove_keys(_CONTEXT_KEYS)

    return wrapper


def metric(name: str, value: float = 1, unit: str = "Count", **dimensions: str) -> None:
    """Emit one EMF metric now (no decorator needed, so it works in routes and workers alike)."""
    from aws_lambda_powertools.metrics import MetricUnit, single_metric  # deferred: not on every path

    with single_metric(name=name, unit=getattr(MetricUnit, unit), value=value, namespace=NAMESPACE) as m:
        m.add_dimension(name="stage", value=os.environ.get("CALLBRIDGE_STAGE", "dev"))
        for key, dim in dimensions.items():
            m.add_dimension(name=key, value=str(dim))
