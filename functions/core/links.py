"""The app's public URLs: its base (PUBLIC_BASE_URL) and a call's stable recording link (R-19),
`{base}/v1/recordings/{call_id}?sig=<HMAC-SHA256 of the call id, secret RECORDING_LINK_SECRET>`.

Here, on the lowest floor, because every reader of a call shows the link (the calls API in calling/, the
write-back in postcall/, the CDR in crm/, the feed in insight/): it is derived from the call id where it is
shown, never stored on the call (its 150-odd bytes would be in every later write of the item).
postcall/recording_links.py answers it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from urllib.parse import quote

from functions.core import secrets

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


def base_url() -> str:
    return (os.environ.get("PUBLIC_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def signature(call_id: str) -> str:
    secret = secrets.get("RECORDING_LINK_SECRET")
    return hmac.new(secret.encode(), call_id.encode(), hashlib.sha256).hexdigest()


def recording_link(call_id: str) -> str:
    return f"{base_url()}/v1/recordings/{quote(call_id, safe='')}?sig={signature(call_id)}"


def stored_recording_link(call_id: str, call: dict) -> str | None:
    """The call's link once its recording is stored, else None (a `recording_url` that calls stored before
    the link was derived still carry is ignored: it may name an old base URL)."""
    if call.get("recording_state") == "stored" and call.get("recording_key"):
        return recording_link(call_id)
    return None
