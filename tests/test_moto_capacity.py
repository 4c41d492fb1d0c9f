"""The local moto server meters DynamoDB capacity units as on-demand DynamoDB bills them (the bench's cost
is priced from these, not from request counts): item sizes in KB, 2 units per item of a transaction,
cancelled or not, the index's own write, reads per 4 KB."""

from __future__ import annotations

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from moto.dynamodb.models import DynamoDBBackend
from moto.dynamodb.responses import DynamoHandler

from infra.local import moto_capacity

TABLE = "capacity-test"


@pytest.fixture
def table():
    saved = {name: getattr(DynamoDBBackend, name) for name in
             ("put_item", "update_item", "delete_item", "transact_write_items", "get_item", "query", "scan")}
    handlers = {name: getattr(DynamoHandler, name) for name in ("get_item", "batch_get_item", "transact_get_items")}
    moto_capacity.patch()
    with mock_aws():
        dynamodb = boto3.resource("dynamodb", region_name="us-east-1")
        created = dynamodb.create_table(
            TableName=TABLE, BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[{"AttributeName": n, "AttributeType": "S"} for n in ("pk", "sk", "phone_key")],
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
            GlobalSecondaryIndexes=[{"IndexName": "by_phone", "Projection": {"ProjectionType": "KEYS_ONLY"},
                                     "KeySchema": [{"AttributeName": "phone_key", "KeyType": "HASH"}]}])
        reset()
        yield created
    for name, method in saved.items():
        setattr(DynamoDBBackend, name, method)
    for name, method in handlers.items():
        setattr(DynamoHandler, name, method)
    reset()


def reset():
    for ops in moto_capacity.UNITS.values():
        ops.clear()


def units() -> dict:
    return moto_capacity.snapshot()


def test_writes_are_billed_per_kb_of_the_larger_of_before_and_after(table):
    table.put_item(Item={"pk": "a", "sk": "1", "v": "x" * 10})
    assert units()["dynamodb_wru"] == {"PutItem": 1}
    table.put_item(Item={"pk": "b", "sk": "1", "v": "x" * 2500})  # 2.5 KB: 3 units
    table.update_item(Key={"pk": "b", "sk": "1"}, UpdateExpression="SET w = :w",
                      ExpressionAttributeValues={":w": 1})  # a small change to a 2.5 KB item: still 3
    table.update_item(Key={"pk": "b", "sk": "1"}, UpdateExpression="REMOVE v")  # shrinks: billed on before
    assert units()["dynamodb_wru"] == {"PutItem": 4, "UpdateItem": 6}
    assert not units()["dynamodb_rru"]  # moto's update reads its item: part of the write, no read of its own
    table.put_item(Item={"pk": "c", "sk": "1", "v": "x" * 1500})
    reset()
    with pytest.raises(ClientError):  # a failed condition is billed on the item as it is
        table.put_item(Item={"pk": "c", "sk": "1"}, ConditionExpression="attribute_not_exists(pk)")
    table.delete_item(Key={"pk": "c", "sk": "1"})
    table.delete_item(Key={"pk": "none", "sk": "1"})  # nothing there: the minimum
    assert units()["dynamodb_wru"] == {"PutItem": 2, "DeleteItem": 3}


def test_a_transaction_is_billed_two_units_per_item_and_kb_applied_or_cancelled(table):
    client = boto3.client("dynamodb", region_name="us-east-1")

    def item(pk, size=10):
        return {"TableName": TABLE, "Item": {"pk": {"S": pk}, "sk": {"S": "1"}, "v": {"S": "x" * size}}}

    client.transact_write_items(TransactItems=[{"Put": item("a")}, {"Put": item("b")}, {"Put": item("c", 1500)}])
    assert units()["dynamodb_wru"] == {"TransactWriteItems": 2 + 2 + 4}
    assert units()["dynamodb_units_by_item"] == {"wru TransactWriteItems a": 2, "wru TransactWriteItems b": 2,
                                                 "wru TransactWriteItems c": 4}
    assert "dynamodb_rru" not in {k for k, v in units().items() if v}  # its look at its own items is no read
    reset()
    with pytest.raises(ClientError):
        client.transact_write_items(TransactItems=[
            {"Put": {**item("d"), "ConditionExpression": "attribute_not_exists(pk)"}},
            {"Put": {**item("a"), "ConditionExpression": "attribute_not_exists(pk)"}}])
    assert units()["dynamodb_wru"] == {"TransactWriteItems": 4}
    assert units()["dynamodb_wru"] and not any(units()["dynamodb_wru"].get(op) for op in ("PutItem", "UpdateItem"))


def test_an_index_write_costs_a_unit_when_the_item_enters_or_moves_in_it(table):
    table.put_item(Item={"pk": "lead", "sk": "1", "phone_key": "p1"})  # enters the index: 1 + 1
    table.update_item(Key={"pk": "lead", "sk": "1"}, UpdateExpression="SET n = :n",
                      ExpressionAttributeValues={":n": 1})  # its index keys unchanged: 1
    table.update_item(Key={"pk": "lead", "sk": "1"}, UpdateExpression="SET phone_key = :p",
                      ExpressionAttributeValues={":p": "p2"})  # moves: 1 + a delete and a put
    table.put_item(Item={"pk": "other", "sk": "1"})  # never in the index: 1
    assert units()["dynamodb_wru"] == {"PutItem": 3, "UpdateItem": 4}


def test_reads_are_billed_per_4_kb_of_what_they_return(table):
    for i in range(3):
        table.put_item(Item={"pk": "p", "sk": str(i), "v": "x" * 2000})
    table.put_item(Item={"pk": "big", "sk": "1", "v": "x" * 5000})
    reset()
    table.get_item(Key={"pk": "big", "sk": "1"}, ConsistentRead=True)  # 5 KB: 2
    table.get_item(Key={"pk": "none", "sk": "1"}, ConsistentRead=True)  # nothing: 1
    table.query(KeyConditionExpression="pk = :p", ExpressionAttributeValues={":p": "p"})  # 6 KB: 2
    table.query(KeyConditionExpression="pk = :p", ExpressionAttributeValues={":p": "none"})  # empty: 1
    assert units()["dynamodb_rru"] == {"GetItem": 3, "Query": 3}
    assert units()["dynamodb_units_by_item"] == {"rru GetItem big": 2, "rru GetItem none": 1, "rru Query p": 2,
                                                 "rru Query none": 1}


def test_the_units_are_in_the_request_counts_answer(table):
    import io
    import json

    from infra.local import moto_atomic

    table.put_item(Item={"pk": "a", "sk": "1"})
    status = []
    answer = b"".join(moto_atomic.RequestCounts(lambda e, s: [b""])(
        {"REQUEST_METHOD": "GET", "PATH_INFO": moto_atomic.COUNTS_PATH, "wsgi.input": io.BytesIO(b"")},
        lambda s, h: status.append(s)))
    assert json.loads(answer)["dynamodb_wru"] == {"PutItem": 1}
