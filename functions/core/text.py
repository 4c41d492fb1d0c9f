"""Text cut to a size in bytes: what DynamoDB, S3 keys and providers count is UTF-8 bytes, not characters."""

from __future__ import annotations


def clip(text: str, max_bytes: int) -> str:
    """The longest prefix of `text` whose UTF-8 form fits in `max_bytes` (never half a character)."""
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode("utf-8", "ignore")
