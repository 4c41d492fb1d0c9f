"""Logging and metrics through Powertools: JSON logs with every phone number masked (R-9), EMF metrics."""

from __future__ import annotations

import os

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


def metric(name: str, value: float = 1, unit: str = "Count", **dimensions: str) -> None:
    """Emit one EMF metric now (no decorator needed, so it works in routes and workers alike)."""
    from aws_lambda_powertools.metrics import MetricUnit, single_metric  # deferred: not on every path

    with single_metric(name=name, unit=getattr(MetricUnit, unit), value=value, namespace=NAMESPACE) as m:
        m.add_dimension(name="stage", value=os.environ.get("CALLBRIDGE_STAGE", "dev"))
        for key, dim in dimensions.items():
            m.add_dimension(name=key, value=str(dim))
