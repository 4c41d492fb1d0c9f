"""Owner alerts (R-23): budget thresholds and channel saturation, each sent once per month or episode.

Contract (the implementation is being filled in): callers in calling/ and tracking/ call these after
the fact they report has been written; a failure to alert never fails the caller's work.
"""

from __future__ import annotations


def channel_use(busy: int, limit: int) -> None:
    """Alert once per saturation episode when busy channels reach the configured share of the limit;
    the episode ends (and the alert re-arms) when use falls below it."""


def spend_changed(month: str, spent_rub: float) -> None:
    """Alert once per configured threshold and budget month when the month's spend crosses it."""
