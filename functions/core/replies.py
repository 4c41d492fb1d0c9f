"""What an HTTP entry point answers: a status, a JSON object or a text body, and optional headers.

Domain code returns a Reply and never sees Chalice; app.py turns it into a Response.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    body: dict | str
    headers: dict = dataclasses.field(default_factory=dict)


def error(status: int, field: str, message: str, **extra) -> Reply:
    """A 4xx that names the field at fault: `{"error": ..., "field": ...}`."""
    return Reply(status, {"error": message, "field": field, **extra})
