"""DynamoDB capacity units metered in the local moto server, as DynamoDB on-demand would bill them.

moto answers ConsumedCapacity with fixed figures (1.0, 0.5) whatever the item, so a count of requests
priced at one unit each misprices the two things that cost most here: a transaction's writes (2 units
per item and KB, for every item of it) and items above 1 KB (the lead with its raw post, a call late in
its life). `patch()` wraps moto's DynamoDB backend and adds, per operation:
- writes (PutItem, UpdateItem, DeleteItem): ceil(size / 1 KB), at least 1, where size is the larger of the
  item before and after the write (a write whose condition failed is billed on the item as it was);
- TransactWriteItems: 2 x ceil(size / 1 KB) for each of its items (Put, Update, Delete, ConditionCheck),
  applied or cancelled;
- a write that adds or changes a global secondary index's keys: 1 unit more per index (KEYS_ONLY
  projections, the template's only kind, are far below 1 KB), 2 when it moves an item between keys;
- reads (GetItem; Query and Scan over the items they return): ceil(size / 4 KB), at least 1, as strongly
  consistent reads, which every read of functions/core/store.py is.

`GET /_callbridge/requests` (moto_atomic.RequestCounts) carries them as the pseudo-services
`dynamodb_wru` and `dynamodb_rru`, {operation: units}, beside the request counts.
"""

from __future__ import annotations

import functools
import math
import threading

WRITE_UNIT = 1024
READ_UNIT = 4096
_LOCK = threading.Lock()
# Set while a write runs: moto's update_item and transact_write_items call its own get_item and put_item,
# which are part of the write and billed by it, not reads or writes of their own.
_INSIDE = threading.local()
_READING = threading.local()  # set while a GetItem, BatchGetItem or TransactGetItems request is answered
# dynamodb_units_by_item: the same units by kind ("wru"/"rru"), operation and the kind of item (its pk up to
# the first '#'), to say which items a figure is made of.
UNITS: dict[str, dict[str, int]] = {"dynamodb_wru": {}, "dynamodb_rru": {}, "dynamodb_units_by_item": {}}


def write_units(size: int) -> int:
    return max(1, math.ceil(size / WRITE_UNIT))


def read_units(size: int) -> int:
    return max(1, math.ceil(size / READ_UNIT))


def _add(kind: str, operation: str, units: int, key: dict | None = None) -> None:
    with _LOCK:
        UNITS[kind][operation] = UNITS[kind].get(operation, 0) + units
        if key is not None:
            pk = key.get("pk")
            pk = next(iter(pk.values()), "?") if isinstance(pk, dict) else getattr(pk, "value", "?")
            name = f"{kind.removeprefix('dynamodb_')} {operation} {str(pk).split('#', 1)[0]}"
            by_item = UNITS["dynamodb_units_by_item"]
            by_item[name] = by_item.get(name, 0) + units


def snapshot() -> dict[str, dict[str, int]]:
    with _LOCK:
        return {kind: dict(ops) for kind, ops in UNITS.items()}


def _current(backend, table_name: str, key: dict) -> tuple[int, list]:
    """The stored item of a request's key ({name: typed value}) as (size, its keys in each global
    secondary index): taken at once, as moto changes an Item in place."""
    try:
        table = backend.get_table(table_name)
        hash_key, range_key = backend.get_keys_value(table, key)
        item = table.get_item(hash_key, range_key)
    except Exception:  # an invalid request: moto answers its error, billed at the minimum
        return 0, []
    return (item.size(), _index_keys(table, item)) if item is not None else (0, [])


def _key_of(backend, table_name: str, attrs: dict) -> dict:
    try:
        table = backend.get_table(table_name)
    except Exception:  # no such table: moto answers its error
        return {}
    names = [n for n in (table.hash_key_attr, table.range_key_attr) if n]
    return {n: attrs[n] for n in names if n in attrs}


def _index_keys(table, item) -> list:
    """Per global secondary index: the item's key values in it (None when the item is not in it)."""
    out = []
    for index in table.global_indexes:
        values = [item.attrs.get(part["AttributeName"]) for part in index.schema]
        out.append(None if any(v is None for v in values) else tuple(str(v.value) for v in values))
    return out


def _index_units(old: list, new: list) -> int:
    units = 0
    for i in range(max(len(old), len(new))):
        o = old[i] if i < len(old) else None
        n = new[i] if i < len(new) else None
        if o != n:
            units += (o is not None) + (n is not None)  # a delete from the old keys, a put at the new ones
    return units


def _billed(before: tuple[int, list], after: tuple[int, list], factor: int) -> int:
    return factor * write_units(max(before[0], after[0])) + _index_units(before[1], after[1])


def _metered(method, wrapper):
    @functools.wraps(method)
    def bound(self, *args, **kwargs):
        return wrapper(method, self, *args, **kwargs)

    bound._metered = True
    return bound


def patch() -> None:
    """Meter moto's DynamoDB backend. Apply before moto_atomic.patch(), so that its lock holds across a
    write and the reads that size it."""
    from moto.dynamodb.models import DynamoDBBackend

    if getattr(DynamoDBBackend.put_item, "_metered", False):
        return

    def single_write(operation: str, key_of):
        def wrapper(method, self, table_name, *args, **kwargs):
            if getattr(_INSIDE, "active", False):
                return method(self, table_name, *args, **kwargs)
            key = key_of(self, table_name, args, kwargs)
            before = after = _current(self, table_name, key)  # a failed write changed nothing
            _INSIDE.active = True
            try:
                result = method(self, table_name, *args, **kwargs)
                after = _current(self, table_name, key)
                return result
            finally:
                _INSIDE.active = False
                _add("dynamodb_wru", operation, _billed(before, after, 1), key)
        return wrapper

    def put_key(backend, table_name, args, kwargs):
        return _key_of(backend, table_name, args[0] if args else kwargs["item_attrs"])

    def plain_key(backend, table_name, args, kwargs):
        return args[0] if args else kwargs["key"]

    def transact(method, self, transact_items, *args, **kwargs):
        targets = []
        for entry in transact_items:
            for op_type, op in entry.items():
                table_name = op.get("TableName", "")
                key = _key_of(self, table_name, op.get("Item", {})) if op_type == "Put" else op.get("Key", {})
                targets.append((table_name, key, _current(self, table_name, key)))
        _INSIDE.active, applied = True, False
        try:
            result = method(self, transact_items, *args, **kwargs)
            applied = True
            return result
        finally:
            _INSIDE.active = False
            # Cancelled: billed on the items as they were (the rollback may not have run yet here).
            for table_name, key, before in targets:
                _add("dynamodb_wru", "TransactWriteItems",
                     _billed(before, _current(self, table_name, key) if applied else before, 2), key)

    def get_item(method, self, table_name, keys, *args, **kwargs):
        item = method(self, table_name, keys, *args, **kwargs)
        # Only the GetItem APIs' own reads: moto's UpdateItem answer and its writes read the item too.
        if getattr(_READING, "active", False) and not getattr(_INSIDE, "active", False):
            _add("dynamodb_rru", "GetItem", read_units(item.size() if item is not None else 0), keys)
        return item

    def listing(operation: str):
        def wrapper(method, self, *args, **kwargs):
            result = method(self, *args, **kwargs)
            items = result[0] if isinstance(result, tuple) else result
            hash_key = kwargs.get("hash_key_dict") or (args[1] if operation == "Query" and len(args) > 1 else None)
            if isinstance(hash_key, dict):  # {"S": value}
                hash_key = next(iter(hash_key.values()), None)
            key = {"pk": {"S": str(getattr(hash_key, "value", hash_key))}} if hash_key is not None else {}
            _add("dynamodb_rru", operation, read_units(sum(i.size() for i in items or [])), key)
            return result
        return wrapper

    def reading(method, self, *args, **kwargs):
        _READING.active = True
        try:
            return method(self, *args, **kwargs)
        finally:
            _READING.active = False

    from moto.dynamodb.responses import DynamoHandler

    for name in ("get_item", "batch_get_item", "transact_get_items"):
        setattr(DynamoHandler, name, _metered(getattr(DynamoHandler, name), reading))
    for name, wrapper in (("put_item", single_write("PutItem", put_key)),
                          ("update_item", single_write("UpdateItem", plain_key)),
                          ("delete_item", single_write("DeleteItem", plain_key)),
                          ("transact_write_items", transact), ("get_item", get_item),
                          ("query", listing("Query")), ("scan", listing("Scan"))):
        setattr(DynamoDBBackend, name, _metered(getattr(DynamoDBBackend, name), wrapper))
