"""infra/local/moto_speed: a Query reads its own partition (the local stack's bottleneck under a burst) and
answers exactly what moto answered before: the partition's items in range-key order, both directions, paged,
filtered, and on the by_phone index."""

from __future__ import annotations

import boto3
from boto3.dynamodb.conditions import Attr, Key
from moto import mock_aws
from moto.dynamodb.models.dynamo_type import DynamoType

from infra.local import moto_speed

moto_speed.patch()  # conftest applies it too; idempotent


def _table():
    ddb = boto3.resource("dynamodb", region_name="us-east-1")
    return ddb.create_table(
        TableName="q", BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[{"AttributeName": n, "AttributeType": "S"} for n in ("pk", "sk", "phone_key",
                                                                                  "created_at")],
        GlobalSecondaryIndexes=[{"IndexName": "by_phone", "Projection": {"ProjectionType": "KEYS_ONLY"},
                                 "KeySchema": [{"AttributeName": "phone_key", "KeyType": "HASH"},
                                               {"AttributeName": "created_at", "KeyType": "RANGE"}]}])


def _fill(table, partitions: int = 40, per_partition: int = 6):
    with table.batch_writer() as batch:
        for p in range(partitions):
            for s in range(per_partition):
                batch.put_item(Item={"pk": f"P#{p:03d}", "sk": f"S#{(s * 7) % per_partition:02d}", "n": s,
                                     "phone_key": f"ph{p % 5}", "created_at": f"2026-12-02T00:{p:02d}:{s:02d}"})


@mock_aws
def test_a_query_answers_its_partition_in_order_both_ways_paged_and_filtered():
    table = _table()
    _fill(table)
    items = table.query(KeyConditionExpression=Key("pk").eq("P#007"))["Items"]
    assert [i["sk"] for i in items] == [f"S#{s:02d}" for s in range(6)]
    assert {i["pk"] for i in items} == {"P#007"}
    backwards = table.query(KeyConditionExpression=Key("pk").eq("P#007"), ScanIndexForward=False)["Items"]
    assert [i["sk"] for i in backwards] == [f"S#{s:02d}" for s in reversed(range(6))]
    ranged = table.query(KeyConditionExpression=Key("pk").eq("P#007") & Key("sk").between("S#02", "S#04"))["Items"]
    assert [i["sk"] for i in ranged] == ["S#02", "S#03", "S#04"]
    first = table.query(KeyConditionExpression=Key("pk").eq("P#007"), Limit=4)
    rest = table.query(KeyConditionExpression=Key("pk").eq("P#007"), ExclusiveStartKey=first["LastEvaluatedKey"])
    assert [i["sk"] for i in first["Items"] + rest["Items"]] == [f"S#{s:02d}" for s in range(6)]
    filtered = table.query(KeyConditionExpression=Key("pk").eq("P#007"), FilterExpression=Attr("n").gte(3))
    assert sorted(int(i["n"]) for i in filtered["Items"]) == [3, 4, 5]
    assert table.query(KeyConditionExpression=Key("pk").eq("P#999"))["Items"] == []
    assert table.scan(Select="COUNT")["Count"] == 240  # the missed partition added nothing


@mock_aws
def test_an_index_query_still_finds_every_item_of_its_key_across_partitions_newest_first():
    table = _table()
    _fill(table)
    found = table.query(IndexName="by_phone", KeyConditionExpression=Key("phone_key").eq("ph3"),
                        ScanIndexForward=False, Limit=3)["Items"]
    assert [(i["pk"], i["sk"]) for i in found] == [("P#038", "S#05"), ("P#038", "S#04"), ("P#038", "S#03")]
    every = table.query(IndexName="by_phone", KeyConditionExpression=Key("phone_key").eq("ph3"))["Items"]
    assert len(every) == 8 * 6 and {i["pk"] for i in every} == {f"P#{p:03d}" for p in range(3, 40, 5)}


@mock_aws
def test_a_query_does_not_sort_the_whole_table(monkeypatch):
    """moto alone sorts every item of the table for each Query (N log N DynamoType comparisons); the patch
    compares only within the partition."""
    table = _table()
    _fill(table, partitions=200)
    comparisons = []
    less_than = DynamoType.__lt__
    monkeypatch.setattr(DynamoType, "__lt__", lambda a, b: comparisons.append(1) or less_than(a, b))
    table.query(KeyConditionExpression=Key("pk").eq("P#100"))
    assert len(comparisons) < 50, len(comparisons)


@mock_aws
def test_a_message_past_its_queues_retention_period_is_still_not_delivered():
    from moto.sqs.models import sqs_backends

    sqs = boto3.client("sqs", region_name="us-east-1")
    url = sqs.create_queue(QueueName="r", Attributes={"MessageRetentionPeriod": "60"})["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="old")
    sqs.send_message(QueueUrl=url, MessageBody="new")
    queue = sqs_backends["123456789012"]["us-east-1"].get_queue("r")
    queue._messages[0].sent_timestamp -= 61_000  # sent 61 s ago: past the 60 s retention
    bodies = [m["Body"] for _ in range(2)
              for m in sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0).get("Messages", [])]
    assert bodies == ["new"], bodies


@mock_aws
def test_a_send_still_deduplicates_by_content_and_the_queue_counts_stay_right():
    sqs = boto3.client("sqs", region_name="us-east-1")
    fifo = sqs.create_queue(QueueName="d.fifo", Attributes={"FifoQueue": "true",
                                                           "ContentBasedDeduplication": "true"})["QueueUrl"]
    for _ in range(3):  # SendMessage reads ContentBasedDeduplication from the queue's attributes
        sqs.send_message(QueueUrl=fifo, MessageBody="same", MessageGroupId="g")
    url = sqs.create_queue(QueueName="plain")["QueueUrl"]
    for n in range(5):
        sqs.send_message(QueueUrl=url, MessageBody=str(n))
    sqs.send_message(QueueUrl=url, MessageBody="later", DelaySeconds=60)
    sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=2, VisibilityTimeout=60)
    counts = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert (counts["ApproximateNumberOfMessages"], counts["ApproximateNumberOfMessagesNotVisible"],
            counts["ApproximateNumberOfMessagesDelayed"]) == ("3", "2", "1")
    fifo_counts = sqs.get_queue_attributes(QueueUrl=fifo, AttributeNames=["ApproximateNumberOfMessages"])
    assert fifo_counts["Attributes"]["ApproximateNumberOfMessages"] == "1"


def test_moto_s_clock_is_the_time_now_and_still_converts_a_given_moment():
    import datetime as dt
    import time

    from moto.core import utils
    from moto.sqs import models

    before = time.time()
    now = utils.unix_time()
    assert before <= now <= time.time() and models.unix_time is utils.unix_time
    assert abs(utils.unix_time_millis() / 1000 - time.time()) < 1
    assert utils.unix_time(dt.datetime(2026, 12, 2, 0, 0, 0)) == dt.datetime(2026, 12, 2, tzinfo=dt.UTC).timestamp()
