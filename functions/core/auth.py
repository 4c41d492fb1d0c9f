"""The API's bearer token (`Authorization: Bearer <CALLBRIDGE_API_TOKEN>`), compared in constant time."""

from __future__ import annotations

from functions.core import secrets


def bearer_ok(headers: dict[str, str]) -> bool:
    """`headers` with lower-case names."""
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    return scheme.lower() == "bearer" and secrets.matches("CALLBRIDGE_API_TOKEN", token.strip())
