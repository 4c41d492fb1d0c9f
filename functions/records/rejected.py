"""Rejected posts (R-5: nothing lost), kept where an operator can find them by day.

Item: rejected post  pk=REJECTED#<yyyy-mm-dd>  sk=<iso time>#<id>  (kept 30 days for inspection); a post too
large for an item is kept whole in the recordings bucket under `raw/`. Its own module, apart from the leads:
only the webhooks write here, so only the API function's role needs s3:PutObject for it (infra/deploy.py
FUNCTION_CALLS counts modules whole).
"""

from __future__ import annotations

import json
import time
import uuid

from functions.core import resources, store, times
from functions.core.text import clip

REJECTED_TTL_SECONDS = 30 * 86400


def keep(source: str, reason: str, field_name: str, raw: dict | str | bytes) -> str:
    """Keep a rejected post (R-5: nothing lost) where an operator can find it by day: a parsed post
    (dict) as JSON, an unreadable one as it came. A post too large for a DynamoDB item (400 KB) is kept
    whole in the recordings bucket under `raw/` (same 30-day lifecycle); the item holds its start."""
    inline_bytes = 100_000  # with the other attributes, far below the item limit whatever the script

    rejected_id = str(uuid.uuid4())
    now = times.now_iso()
    if isinstance(raw, dict):
        raw = json.dumps(raw, ensure_ascii=False)
    data = raw if isinstance(raw, bytes) else raw.encode()
    text = data.decode("utf-8", "replace")
    item = {
        "pk": f"REJECTED#{now[:10]}",
        "sk": f"{now}#{rejected_id}",
        "rejected_id": rejected_id,
        "source": source,
        "reason": clip(reason, 1000),
        "field": clip(field_name, 256),
        "raw": text,
        "received_at": now,
        "ttl": int(time.time()) + REJECTED_TTL_SECONDS,
    }
    if len(data) > inline_bytes or text.encode() != data:  # too big, or not text: the bytes go to S3
        key = f"raw/rejected/{now[:10]}/{rejected_id}"
        resources.client("s3").put_object(Bucket=resources.bucket_name(), Key=key, Body=data,
                                          ContentType="application/octet-stream")
        item.update(raw=clip(text, inline_bytes), raw_s3_key=key, raw_bytes=len(data), raw_truncated=True)
    resources.table().put_item(Item=item)
    return rejected_id


def on(day: str) -> list[dict]:
    """Rejected posts of one UTC day (yyyy-mm-dd), oldest first (all pages, unlike a single query)."""
    return store.query(f"REJECTED#{day}")
