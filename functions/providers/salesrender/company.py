"""Which SalesRender company callbridge works for, from its configuration (no import of the plugin's crypto:
the recorder and the write-back ask this on every call)."""

from __future__ import annotations

import os
import re


def company_id() -> str | None:
    """The id in SALESRENDER_API_URL (`.../companies/{id}/CRM`), else SALESRENDER_COMPANY_ID; None when
    neither says."""
    match = re.search(r"/companies/([^/]+)/CRM", os.environ.get("SALESRENDER_API_URL") or "")
    return match.group(1) if match else (os.environ.get("SALESRENDER_COMPANY_ID") or None)
