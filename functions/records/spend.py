"""Telephony spend per calendar month (R-23), pk=SPEND#<yyyy-mm> sk=TOTAL.

The call tracker adds each call's cost; calling/budget.py checks it before every call.
"""

from __future__ import annotations

import datetime as dt

from functions.core import store


def month(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m")


def _key(yyyy_mm: str) -> dict:
    return {"pk": f"SPEND#{yyyy_mm}", "sk": "TOTAL"}


def spent(yyyy_mm: str | None = None) -> float:
    return float((store.get(_key(yyyy_mm or month())) or {}).get("rub", 0))


def add(rub: float, yyyy_mm: str | None = None) -> float:
    """Add a call's cost; returns the month's new total."""
    item = store.update(_key(yyyy_mm or month()), {}, add={"rub": round(rub, 2), "calls": 1}, return_new=True)
    return float(item["rub"])
