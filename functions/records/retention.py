"""How long personal data is kept (R-19's recordings aside): leads, calls, their bindings and events.

Each such item carries `ttl` (epoch seconds, the table's TimeToLiveSpecification in infra/template.yaml),
set when it is written to `data_retention_days` from then; DynamoDB deletes it some time after that.
"""

from __future__ import annotations

import time

from functions.core import config


def ttl(now: float | None = None) -> int:
    """The `ttl` attribute for a personal-data item written now."""
    return int(time.time() if now is None else now) + config.load().data_retention_days * 86400
