"""Logs (R-9): one JSON object per line, and never a full phone number, whatever field holds it."""

from __future__ import annotations

import json
import threading

from chalice import ConvertToMiddleware

import app as app_module  # imported before a test swaps the log stream: Chalice configures its logger on import
from functions.core.observability import PhoneMaskingFormatter, logger

MASKED = "+7 999 ***-**-33"


def lines(buffer) -> list[dict]:
    text = buffer.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_the_logger_masks_through_its_formatter():
    assert isinstance(logger.registered_formatter, PhoneMaskingFormatter)


def test_phone_in_extra_is_masked(log_output):
    logger.info("x", extra={"phone": "+79991112233"})
    [record] = lines(log_output)
    assert record["message"] == "x"
    assert record["phone"] == MASKED
    assert record["level"] == "INFO" and record["service"] == "callbridge"
    assert "1112233" not in log_output.getvalue()


def test_phones_in_the_message_and_nested_extras_are_masked(log_output):
    logger.warning("lead from 8 (999) 111-22-33 rejected",
                   extra={"lead": {"raw": {"Phone": "+7 (999) 111-22-33"}, "phones": ["89991112233"]},
                          "error": "SalesRender ERR_ORDER_VALIDATION_FAILED: phone 9991112233 is invalid"})
    [record] = lines(log_output)
    assert record["message"] == f"lead from {MASKED} rejected"
    assert record["lead"] == {"raw": {"Phone": MASKED}, "phones": [MASKED]}
    assert record["error"] == f"SalesRender ERR_ORDER_VALIDATION_FAILED: phone {MASKED} is invalid"


def test_exception_text_and_stack_trace_are_masked(log_output):
    try:
        raise ValueError("SalesRender rejected +79991112233 for order 48211")
    except ValueError:
        logger.exception("order failed", extra={"lead_id": "lead-1"})
    [record] = lines(log_output)
    assert record["level"] == "ERROR" and record["exception_name"] == "ValueError"
    assert f"ValueError: SalesRender rejected {MASKED} for order 48211" in record["exception"]
    assert record["stack_trace"]["value"] == f"SalesRender rejected {MASKED} for order 48211"
    assert record["stack_trace"]["type"] == "ValueError"
    assert "1112233" not in log_output.getvalue()


def test_ids_and_timestamps_survive_masking(log_output):
    ids = {"tranid": "1234567:8901234567", "lead_id": "123e4567-e89b-12d3-a456-426614174000",
           "epoch_ms": 1779987800120, "order_id": "48211", "formid": "form493249737"}
    logger.info("lead accepted", extra={**ids, "phone": "+79991112233"})
    [record] = lines(log_output)
    assert {k: record[k] for k in ids} == ids
    assert record["phone"] == MASKED


def test_every_line_is_one_json_object(log_output):
    logger.info("first", extra={"phone": "+79991112233"})
    logger.info("second\nwith a newline and Кириллица", extra={"n": 2, "nested": {"a": [1, None, True]}})
    logger.warning("third", extra={"comment": 'quotes " and \\ backslash'})
    records = lines(log_output)
    assert [r["message"] for r in records] == ["first", "second\nwith a newline and Кириллица", "third"]
    assert records[1]["nested"] == {"a": [1, None, True]}
    assert records[2]["comment"] == 'quotes " and \\ backslash'


def test_debug_is_not_written_at_the_default_level(log_output):
    logger.debug("quiet", extra={"phone": "+79991112233"})
    assert log_output.getvalue() == ""


def test_a_phone_at_the_start_of_a_line_is_masked(log_output):
    logger.info("lead comment", extra={"comment": "Перезвоните\n89991112233"})
    [record] = lines(log_output)
    assert record["comment"] == f"Перезвоните\n{MASKED}"


class _Context:
    def __init__(self, name: str):
        self.function_name = name
        self.memory_limit_in_mb = 256
        self.invoked_function_arn = f"arn:aws:lambda:us-east-1:123456789012:function:{name}"
        self.aws_request_id = f"request-of-{name}"


def test_concurrent_invocations_each_log_their_own_function_name(log_output):
    """The local runner runs several handlers at once in one process; each line names its own function."""
    [inject] = [m._wrapper for m, _ in app_module.app.middleware_handlers if isinstance(m, ConvertToMiddleware)]
    both_entered = threading.Barrier(2, timeout=10)
    errors = []

    def handler(event, context):
        both_entered.wait()  # both invocations have set up their context before either logs
        logger.info("working", extra={"who": context.function_name})
        return "done"

    def invoke(name):
        try:
            assert inject(handler)({}, _Context(name)) == "done"
        except Exception as exc:  # surfaced below: an assert in a thread would pass silently
            errors.append(exc)

    threads = [threading.Thread(target=invoke, args=(n,)) for n in ("callbridge-local-intake_worker",
                                                                    "callbridge-local-callback_worker")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    records = lines(log_output)
    assert len(records) == 2
    for record in records:
        assert record["function_name"] == record["who"]
        assert record["function_request_id"] == f"request-of-{record['who']}"
    logger.info("after the invocations")
    assert "function_name" not in lines(log_output)[-1]  # nothing of an invocation outlives it
