"""moto's TransactWriteItems with a rollback that copies the items it touches, not whole tables.

moto 5.2 backs up a transaction by deep-copying the entire table once per item of the transaction,
so a transaction costs time in proportion to the table: with 2,000 items a two-item transaction took
0.56 s against 0.01 s for an UpdateItem. The reports' counters (functions/records/daily.py) ride in a
transaction on every lead, call claim, call end and call cost, so the state table of a long-running
`make run`, or a test that creates many calls, would slow down without bound.

`patch()` snapshots only the items named by the transaction (their keys are in the request), lets
moto run it with its table "backup" reduced to the table itself, and on any failure puts the
snapshots back. Every other item is untouched by a transaction, so this restores exactly what the
deep copy restored. It runs under infra/local/moto_atomic's write lock, so no other write can slip
in between the snapshot and the transaction. Apply it before or after moto_atomic.patch().
"""

from __future__ import annotations

import copy
import functools
import threading

_ACTIVE = threading.local()


class _CopyModule:
    """Stands in for `copy` inside moto.dynamodb.models: a Table is "copied" as itself while one of our
    wrapped transactions runs on this thread; everything else is copied as usual."""

    def __getattr__(self, name):
        return getattr(copy, name)

    @staticmethod
    def deepcopy(value, memo=None):
        from moto.dynamodb.models.table import Table

        if getattr(_ACTIVE, "on", False) and isinstance(value, Table):
            return value
        return copy.deepcopy(value, memo)


def _touched(backend, transact_items) -> list[tuple]:
    """(table, hash value, range value, deep copy of the item or None) for every item in the request."""
    from moto.dynamodb.exceptions import MockValidationException
    from moto.dynamodb.models.dynamo_type import DynamoType

    found = []
    for entry in transact_items:
        if not isinstance(entry, dict) or len(entry) != 1:
            continue
        op = next(iter(entry.values()))
        table = backend.tables.get(op.get("TableName")) if isinstance(op, dict) else None
        key = (op.get("Key") or op.get("Item")) if table is not None else None
        if not isinstance(key, dict) or table.hash_key_attr not in key:
            continue
        hash_value = DynamoType(key[table.hash_key_attr])
        range_value = None
        if table.range_key_attr is not None:
            if table.range_key_attr not in key:
                continue
            range_value = DynamoType(key[table.range_key_attr])
        try:
            current = table.get_item(hash_value, range_value)
        except MockValidationException:  # a malformed key: moto rejects the request before writing anything
            continue
        found.append((table, hash_value, range_value, copy.deepcopy(current)))
    return found


def _restore(touched: list[tuple]) -> None:
    for table, hash_value, range_value, item in reversed(touched):
        if range_value is None:
            if item is None:
                table.items.pop(hash_value, None)
            else:
                table.items[hash_value] = item
        elif item is None:
            table.items[hash_value].pop(range_value, None)
        else:
            table.items[hash_value][range_value] = item


def patch() -> None:
    from moto.dynamodb import models
    from moto.dynamodb.models import DynamoDBBackend

    from infra.local.moto_atomic import _LOCK

    method = DynamoDBBackend.transact_write_items
    if getattr(method, "_item_rollback", False) or getattr(getattr(method, "__wrapped__", None), "_item_rollback",
                                                           False):
        return
    models.copy = _CopyModule()

    @functools.wraps(method)
    def transact_write_items(self, transact_items, *args, __method=method, **kwargs):
        with _LOCK:  # re-entrant: moto_atomic's wrapper may hold it already
            touched = _touched(self, transact_items)
            _ACTIVE.on = True
            try:
                return __method(self, transact_items, *args, **kwargs)
            except BaseException:
                _restore(touched)
                raise
            finally:
                _ACTIVE.on = False

    transact_write_items._item_rollback = True
    DynamoDBBackend.transact_write_items = transact_write_items
