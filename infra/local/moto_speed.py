"""Where moto 5.2 repeats work per request or its cost grows with its state, the local stack's moto is mended.

The bench's burst (issue 9) found the moto server to be the local stack's bottleneck: one process on one
core serves every request of every worker. A profile of a 200-lead burst showed:

1. Query: moto lists every item of the table and sorts them (`Table.all_items`, N log N DynamoType
   comparisons for N items) and then keeps the asked partition, so each Query got slower as the state table
   grew. While a Query runs on this thread, `all_items` now returns only the asked partition for a query on
   the table (moto then sorts it by range key as before), and every item unsorted for a query on an index
   (moto filters and sorts those results itself). Scan and everything else still see the sorted list.
2. Dispatch: every request listed moto's package directory (~150 `isdir` calls, `list_of_moto_modules`) to
   tell a service from a host, and looked up its response class's methods with `inspect.getmembers`; both
   are the same on every request and are now computed once.
3. SQS ReceiveMessage computed all of a queue's attributes, counting its messages, to read its retention
   period; it now reads the retention period.
4. A long poll looks again every second for messages that became visible without a notice (a delay or a
   visibility timeout ending), so a dispatch sent with the offer's one-second wrap-up as DelaySeconds
   reached its poller up to a second late; it now looks every POLL_TICK_SECONDS.

5. SendMessage computed all of the queue's attributes, counting its messages three times over, to read
   ContentBasedDeduplication: with a backlog of a thousand intake messages, over a third of moto's CPU. While
   a SendMessage runs on this thread the ApproximateNumberOfMessages* counts (which it never reads) are not
   counted; GetQueueAttributes still counts them.
6. moto's clock (`unix_time()` with no argument, which every message's visibility and delay check calls,
   once per message per receive) built two datetimes and imported `datetime.UTC` on each call; it is now
   `time.time()`, the same number.

Every answer is still moto's own: its results, their order, paging and filters; only the work of finding
them changed (tests/test_moto_speed.py).
"""

from __future__ import annotations

import functools
import threading

_QUERY = threading.local()


def patch() -> None:
    _patch_query()
    _patch_dispatch()
    _patch_sqs_retention()
    _patch_long_poll_tick()
    _patch_send_attributes()
    _patch_clock()


_SENDING = threading.local()
_COUNTS = ("approximate_number_of_messages", "approximate_number_of_messages_delayed",
           "approximate_number_of_messages_not_visible")


def _patch_send_attributes() -> None:
    from moto.sqs.models import Queue, SQSBackend

    send = SQSBackend.send_message
    if getattr(send, "_uncounted", False):
        return

    def uncounted(counted):
        # Thread-local: a GetQueueAttributes on another thread meanwhile still counts.
        return property(lambda queue: 0 if getattr(_SENDING, "active", False) else counted.fget(queue))

    for name in _COUNTS:
        setattr(Queue, name, uncounted(getattr(Queue, name)))

    @functools.wraps(send)
    def send_message(self, *args, **kwargs):
        outer = getattr(_SENDING, "active", False)
        _SENDING.active = True
        try:
            return send(self, *args, **kwargs)
        finally:
            _SENDING.active = outer

    send_message._uncounted = True
    SQSBackend.send_message = send_message


def _patch_clock() -> None:
    import sys
    import time

    from moto.core import utils

    original = utils.unix_time
    if getattr(original, "_direct", False):
        return

    def unix_time(dt=None):
        return time.time() if dt is None else original(dt)

    unix_time._direct = True
    # unix_time_millis looks unix_time up in moto.core.utils; modules that imported the name hold their own.
    for module in [m for name, m in list(sys.modules.items()) if name.startswith("moto") and m is not None]:
        if getattr(module, "unix_time", None) is original:
            module.unix_time = unix_time


def _patch_dispatch() -> None:
    from moto import backends
    from moto.core import responses

    if getattr(backends.list_of_moto_modules, "_once", False):
        return
    modules = tuple(backends.list_of_moto_modules())
    backends.list_of_moto_modules = lambda: modules  # werkzeug_app calls it through the module
    backends.list_of_moto_modules._once = True
    names = functools.cache(responses.method_names_from_class)
    responses.method_names_from_class = names  # a response class's methods do not change while moto runs


POLL_TICK_SECONDS = 0.1


def _patch_long_poll_tick() -> None:
    from moto.sqs.models import Queue

    wait = Queue.wait_for_messages
    if getattr(wait, "_tick", False):
        return

    def wait_for_messages(queue, timeout):
        return wait(queue, min(timeout, POLL_TICK_SECONDS))

    wait_for_messages._tick = True
    Queue.wait_for_messages = wait_for_messages


def _patch_sqs_retention() -> None:
    from moto.core.utils import unix_time
    from moto.sqs.models import SQSBackend

    if getattr(SQSBackend.is_message_valid_based_on_retention_period, "_direct", False):
        return

    def is_message_valid_based_on_retention_period(self, queue_name, message):
        retention = int(self.get_queue(queue_name).message_retention_period)
        return retention + message.sent_timestamp / 1000 > unix_time()

    is_message_valid_based_on_retention_period._direct = True
    SQSBackend.is_message_valid_based_on_retention_period = is_message_valid_based_on_retention_period


def _patch_query() -> None:
    from moto.dynamodb.models.table import Table

    if getattr(Table.query, "_partition_read", False):
        return
    sorted_all_items = Table.all_items
    query = Table.query

    def all_items(self):
        scope = getattr(_QUERY, "scope", None)
        if scope is None or scope[0] is not self:
            return sorted_all_items(self)
        _table, hash_key, index_name = scope
        if index_name:
            if not self.range_key_attr:
                return list(self.items.values())
            return [item for partition in self.items.values() for item in partition.values()]
        partition = self.items.get(hash_key)  # .get: items is a defaultdict, a miss must not add a key
        if partition is None:
            return []
        return list(partition.values()) if self.range_key_attr else [partition]

    @functools.wraps(query)
    def partition_query(self, hash_key, *args, **kwargs):
        index_name = kwargs.get("index_name", args[6] if len(args) > 6 else None)
        outer = getattr(_QUERY, "scope", None)
        _QUERY.scope = (self, hash_key, index_name)
        try:
            return query(self, hash_key, *args, **kwargs)
        finally:
            _QUERY.scope = outer

    partition_query._partition_read = True
    Table.all_items = all_items
    Table.query = partition_query
