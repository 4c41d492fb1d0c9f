"""Owner alerts (R-23, seed §5.3): budget thresholds and channel saturation, each sent once per month or episode.

Callers in calling/ and tracking/ call these after the fact they report has been written (a cost added
to the month, a channel taken); a failure to alert never fails the caller's work: it is logged and
counted (`AlertsFailed`), and the next spend change or channel check tries again.

- `spend_changed(month, spent_rub)`: at each `budget.alert_thresholds` share of `budget.monthly_rub`
  (default 80% and 100%), one alert per threshold and budget month. It is called by the call tracker when
  a call's cost is added, and by the budget check before every call (calling/budget.py), so an alert whose
  sender crashed goes out with the next call at the latest, and so does one made due by a lowered budget.
- `channel_use(busy, limit)`: when `provider.channel_alert_ratio` (default 0.8) of the channels are busy,
  one alert per saturation episode; the episode ends when use falls below the share, and a new one is
  alerted only CHANNEL_REALERT_SECONDS after the last alert, so use that flaps around the line (4 of 5
  busy, then 3, then 4) does not page the owner every minute.

Once means: publish, then write the marker with a condition (records/alert_marks.py). Never the marker
first: a crash between the two would lose the alert for the month. The price is the other direction: a
crash after the publish, or two senders crossing the line at the same moment, may send an alert twice.

Every alert is also a WARNING log line (`owner alert`), which is where the local stack shows it (`make run`
prints the app's and the runner's log lines); in AWS it goes to the SNS topic ALERTS_TOPIC_ARN (the
template's AlertsTopic, which e-mails AlertEmail). The metrics BudgetUsedPercent and ChannelsBusyPercent
feed the CloudWatch alarms and dashboard of infra/template.yaml.
"""

from __future__ import annotations

import time

from functions.core import config, resources
from functions.core.observability import logger, metric
from functions.records import alert_marks

CHANNEL_REALERT_SECONDS = 30 * 60
SUBJECT_PREFIX = "callbridge"


def _rub(value: float) -> str:
    return f"{value:,.0f}".replace(",", " ")


def publish(subject: str, message: str, kind: str) -> None:
    """Send one alert to the owner: the SNS topic when there is one, and always a WARNING log line."""
    subject = f"{SUBJECT_PREFIX} {resources.stage()}: {subject}"[:99]  # SNS: ASCII, under 100 characters
    topic = resources.alerts_topic_arn()
    if topic:
        resources.client("sns").publish(TopicArn=topic, Subject=subject, Message=message)
        metric("AlertsSent", kind=kind)
    logger.warning("owner alert", extra={"alert": kind, "subject": subject, "text": message,
                                         "sent_to": "sns" if topic else "this log only (no ALERTS_TOPIC_ARN)"})


def spend_changed(month: str, spent_rub: float) -> None:
    """Alert once per configured threshold and budget month when the month's spend crosses it."""
    try:
        _spend_changed(month, float(spent_rub))
    except Exception as exc:  # noqa: BLE001 - an alert must never fail the call it reports on
        logger.error("budget alert failed", extra={"month": month, "error": str(exc), "error_type": type(exc).__name__})
        metric("AlertsFailed", kind="budget")


def _spend_changed(month: str, spent: float) -> None:
    budget = config.load().budget
    percent = 100 * spent / budget.monthly_rub
    metric("BudgetUsedPercent", round(percent, 2), unit="Percent")
    due = sorted(t for t in set(budget.alert_thresholds) if spent >= t * budget.monthly_rub)
    if not due:
        return
    sent = alert_marks.budget_sent(month)
    for threshold in due:
        if alert_marks.budget_was_sent(sent, threshold):
            continue
        share = f"{threshold * 100:g}%"
        stop = threshold >= 1 and budget.stop_auto_callbacks_at_limit
        consequence_en = ("Automatic callbacks are stopped until the next month or a higher budget.monthly_rub"
                          + ("; manual calls still go." if budget.manual_calls_at_limit else "; so are manual calls.")
                          if stop else "At 100% automatic callbacks stop.")
        consequence_ru = ("Автоматические перезвоны остановлены до следующего месяца или увеличения бюджета"
                          + ("; ручные звонки идут." if budget.manual_calls_at_limit else "; ручные тоже.")
                          if stop else "При 100% автоматические перезвоны остановятся.")
        message = (f"Telephony spend for {month}: {_rub(spent)} RUB of the {_rub(budget.monthly_rub)} RUB budget "
                   f"({percent:.0f}%, threshold {share}). {consequence_en}\n"
                   f"Расход на телефонию за {month}: {_rub(spent)} ₽ из {_rub(budget.monthly_rub)} ₽ "
                   f"({percent:.0f}%, порог {share}). {consequence_ru}")
        publish(f"budget {share} reached ({month})", message, "budget")
        alert_marks.mark_budget_sent(month, threshold)  # after the publish: a crash here may repeat it, never lose it


def channel_use(busy: int, limit: int) -> None:
    """Alert once per saturation episode when busy channels reach the configured share of the limit;
    the episode ends (and the alert re-arms) when use falls below it."""
    try:
        _channel_use(int(busy), int(limit))
    except Exception as exc:  # noqa: BLE001 - an alert must never fail the dial it reports on
        logger.error("channel alert failed", extra={"error": str(exc), "error_type": type(exc).__name__})
        metric("AlertsFailed", kind="channels")


def _channel_use(busy: int, limit: int, now: float | None = None) -> None:
    if limit <= 0:
        return
    now = time.time() if now is None else now
    share = config.load().provider.channel_alert_ratio
    percent = 100 * busy / limit
    metric("ChannelsBusyPercent", round(percent, 2), unit="Percent")
    state = alert_marks.channels()
    if busy < share * limit:
        if state["saturated"]:
            alert_marks.mark_unsaturated()
        return
    if state["saturated"]:
        return  # this episode was handled
    last = state["alerted_at"]
    if last is not None and now - float(last) < CHANNEL_REALERT_SECONDS:
        alert_marks.mark_saturated(None)  # a new episode, but too soon after the last alert to page again
        return
    message = (f"{busy} of {limit} telephony channels are busy ({percent:.0f}%, alert at {share * 100:g}%). "
               "New callbacks wait for a free channel; raise provider.channel_limit (and the channels at "
               "Beeline) if this happens often.\n"
               f"Заняты {busy} из {limit} каналов ({percent:.0f}%, порог {share * 100:g}%). Новые перезвоны ждут "
               "свободного канала; если это часто, увеличьте provider.channel_limit (и число каналов у Beeline).")
    publish(f"{busy} of {limit} channels busy", message, "channels")
    alert_marks.mark_saturated(now)  # after the publish (see the module docstring)
