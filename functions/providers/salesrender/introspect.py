"""Read-only look-ups of a SalesRender company's set-up, for the doctor (functions/insight/doctor.py).

The project, status and order-field names an offer uses are per company (providers/salesrender.md):
`projectsFetcher`, `statusesFetcher { statuses { id name group archived } }` and `orderFieldsFetcher`
(each field's `name`, `label` and `__typename`, which says its kind). They go through the client's
public `execute`, so errors (a rejected token, a GraphQL error in an HTTP 200) are classified as for
every other request.
"""

from __future__ import annotations

from functions.providers.salesrender.client import SalesRenderClient, SalesRenderError

PROJECTS = "query Projects { projectsFetcher { projects { id name } } }"
STATUSES = "query Statuses { statusesFetcher { statuses { id name group archived } } }"
ORDER_FIELDS = "query OrderFields { orderFieldsFetcher { fields { __typename name label } } }"

# __typename of an order field -> the orderData list a value of that kind goes into.
FIELD_KINDS = {"PhoneOrderField": "phone", "HumanNameOrderField": "humanName", "EmailOrderField": "email",
               "StringOrderField": "string"}


def _list(data: dict, fetcher: str, key: str) -> list[dict]:
    items = (data.get(fetcher) or {}).get(key)
    if not isinstance(items, list):
        raise SalesRenderError(f"{fetcher} answered without {key}", code="NO_DATA", transient=True)
    return [i for i in items if isinstance(i, dict)]


def projects(client: SalesRenderClient) -> list[dict]:
    return _list(client.execute(PROJECTS), "projectsFetcher", "projects")


def statuses(client: SalesRenderClient) -> list[dict]:
    return _list(client.execute(STATUSES), "statusesFetcher", "statuses")


def order_fields(client: SalesRenderClient) -> list[dict]:
    """[{name, label, kind}], kind one of phone/humanName/email/string (None for another kind)."""
    return [{"name": f.get("name"), "label": f.get("label"), "kind": FIELD_KINDS.get(str(f.get("__typename")))}
            for f in _list(client.execute(ORDER_FIELDS), "orderFieldsFetcher", "fields")]
