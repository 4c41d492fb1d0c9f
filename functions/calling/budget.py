"""The budget rule (R-23): once the month's telephony spend reaches the budget, which calls may go on.

The month is the business's calendar month (`budget.timezone`, records/spend.py). At 100% an automatic
callback waits (`stop_auto_callbacks_at_limit`, the dialer's "budget_waiting": it looks again every
15 minutes, so a new month or a raised `budget.monthly_rub` resumes it) and a manual call follows
`manual_calls_at_limit`. Every check also hands the month's spend to the owner alerts, so a threshold
alert that its sender (the call tracker) lost in a crash, or one made due by a lowered budget, goes out
before the next call.
"""

from __future__ import annotations

import datetime as dt

from functions.calling import alerts
from functions.core.config import Config
from functions.records import spend


def allows_call(cfg: Config, manual: bool, now: dt.datetime | None = None) -> bool:
    """False once the month's spend reached the budget and such calls are to stop (R-23)."""
    month = spend.month(now)
    spent = spend.spent(month)
    alerts.spend_changed(month, spent)
    if spent < cfg.budget.monthly_rub:
        return True
    if manual:
        return cfg.budget.manual_calls_at_limit
    return not cfg.budget.stop_auto_callbacks_at_limit


def cost_added(month: str) -> None:
    """A call's cost was added to `month` (the call tracker): tell the owner alerts the new total."""
    alerts.spend_changed(month, spend.spent(month))
