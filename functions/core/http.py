"""Outbound HTTP: one pooled requests.Session per provider with timeouts and bounded retries."""

from __future__ import annotations

import functools
from collections.abc import Callable

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from functions.core import secrets

# (connect, read) seconds. Every outbound call passes a timeout; these are the defaults.
DEFAULT_TIMEOUT = (3.05, 20)


def session(retries: Retry) -> requests.Session:
    """A session whose adapter retries as `retries` says (urllib3 backs off between tries)."""
    s = requests.Session()
    adapter = HTTPAdapter(max_retries=retries, pool_maxsize=10)
    s.mount("https://", adapter)
    s.mount("http://", adapter)
    return s


def connect_only_retry(total: int = 2, statuses: tuple[int, ...] = (429, 503)) -> Retry:
    """For requests that must not run twice (creating an order, originating a call): retry only
    when the request never reached the server (connection refused/reset before sending) or the
    server said it did not take it (`statuses`: 429/503 by default; a caller for whom a 503 is
    ambiguous passes (429,)). A read timeout is NOT retried here: the caller decides."""
    return Retry(
        total=total,
        connect=total,
        read=0,
        other=0,
        status=total,
        status_forcelist=statuses,
        allowed_methods=None,  # POST included, on the conditions above only
        backoff_factor=0.5,
        respect_retry_after_header=False,  # a long Retry-After would outlive the Lambda: the queue waits instead
        raise_on_status=False,
    )


def idempotent_retry(total: int = 3) -> Retry:
    """For reads and idempotent writes: also retry read timeouts and 5xx."""
    return Retry(
        total=total,
        backoff_factor=0.5,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=None,
        respect_retry_after_header=False,  # a long Retry-After would outlive the Lambda: the queue waits instead
        raise_on_status=False,
    )


def client_per_credentials(factory: Callable, url: Callable[[], str], token_name: str) -> Callable:
    """A provider's `default_client()`: one shared client, built again only when the URL or the token
    changes, so a token rotated in SSM (seen once the secret's 5-minute cache expires) is used at once
    instead of the old one living on. `default_client.cache_clear()` resets it (tests)."""
    build = functools.lru_cache(maxsize=1)(factory)

    def default_client():
        return build(url(), secrets.get(token_name))

    default_client.cache_clear = build.cache_clear
    return default_client
