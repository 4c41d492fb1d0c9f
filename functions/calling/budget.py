"""The budget rule (R-23): once the month's telephony spend reaches the budget, which calls may go on."""

from __future__ import annotations

import datetime as dt

from functions.core.config import Config
from functions.records import spend


def allows_call(cfg: Config, manual: bool, now: dt.datetime | None = None) -> bool:
    """False once the month's spend reached the budget and such calls are to stop (R-23)."""
    if spend.spent(spend.month(now)) < cfg.budget.monthly_rub:
        return True
    if manual:
        return cfg.budget.manual_calls_at_limit
    return not cfg.budget.stop_auto_callbacks_at_limit
