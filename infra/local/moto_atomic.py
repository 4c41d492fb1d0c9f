"""Make moto's DynamoDB writes atomic, as DynamoDB's are.

DynamoDB evaluates a ConditionExpression and applies the write as one atomic step; moto 5.2 checks
and writes without a lock, so two threads can both pass `attribute_not_exists(holder)`. Channel
leases, call claims and the webhook's one-lead-per-tranid all rest on that atomicity, so tests and the
local stack would otherwise show races that cannot happen in AWS (or hide real ones among them).
`patch()` serialises moto's write operations with one lock; `python -m infra.local.moto_atomic`
runs the moto server with the patch applied (what `make run` starts).
"""

from __future__ import annotations

import functools
import sys
import threading

_LOCK = threading.RLock()
_WRITES = ("put_item", "update_item", "delete_item", "transact_write_items", "batch_write_item")


def patch() -> None:
    from moto.dynamodb.models import DynamoDBBackend

    for name in _WRITES:
        method = getattr(DynamoDBBackend, name, None)
        if method is None or getattr(method, "_atomic", False):
            continue

        @functools.wraps(method)
        def atomic(self, *args, __method=method, **kwargs):
            with _LOCK:
                return __method(self, *args, **kwargs)

        atomic._atomic = True
        setattr(DynamoDBBackend, name, atomic)


def main() -> int:
    patch()
    from moto.server import main as moto_main

    moto_main(sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
