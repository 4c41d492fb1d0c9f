"""Outbound HTTP: one pooled requests.Session per provider with timeouts, bounded retries and a
client-side rate limit.

The rate limit is a token bucket per provider and per container (`limiter(name)`), taken once per
request the session sends (urllib3's own bounded retries inside that request are not counted again).
A request that would wait longer than the bucket's `max_wait` raises `RateLimited` before anything is
sent: a `requests.ConnectionError`, so every caller already treats it as "never reached the server"
and retries it later through its queue.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from functions.core import secrets

# (connect, read) seconds. Every outbound call passes a timeout; these are the defaults.
DEFAULT_TIMEOUT = (3.05, 20)


class RateLimited(requests.ConnectionError):
    """The client-side rate limit kept this request from being sent (nothing reached the server)."""


class TokenBucket:
    """`rate` requests per second on average, bursts of up to `burst`; thread-safe. `take()` waits for a
    token up to `max_wait` seconds, else raises RateLimited. `clock`/`sleep` are injectable for tests."""

    def __init__(self, rate: float, burst: int, max_wait: float = 5.0, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst, self.max_wait = float(rate), int(burst), float(max_wait)
        self._clock, self._sleep = clock, sleep
        self._tokens, self._at = float(burst), clock()
        self._lock = threading.Lock()
        self.waited = 0.0  # seconds spent waiting in all (for logs and tests)

    def _reserve(self) -> float:
        """Take a token now or book the next one; the seconds to wait before using it."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            wait = 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate
            if wait > self.max_wait:
                raise RateLimited(f"client-side rate limit: next request in {wait:.1f} s")
            self._tokens -= 1  # may go negative: the booked token is the next one to come
            return wait

    def take(self) -> None:
        wait = self._reserve()
        if wait > 0:
            self.waited += wait
            self._sleep(wait)


# Requests per second and burst per provider and per container. Neither provider documents a limit
# (providers/beeline.md: "No rate limits are documented: be polite"; SalesRender's docs say nothing), so
# these are assumptions: at most 10 requests/s per container, bursts of 20 (a dial needs about 3 requests;
# the intake worker one addOrder per lead). The callbacks queue runs at most one dialer per channel
# (resources.max_concurrency), so dialling stays near 10 x channel_limit per second at the very worst.
# Override per stage with RATE_LIMIT_<NAME>="<rate>/<burst>" (e.g. RATE_LIMIT_SALESRENDER="3/5").
LIMITS = {"beeline": (10.0, 20), "salesrender": (10.0, 20)}
MAX_WAIT_SECONDS = 10.0  # longer, and the request is refused (RateLimited) for its queue to retry later
_buckets: dict[str, TokenBucket] = {}
_buckets_lock = threading.Lock()


def limiter(name: str) -> TokenBucket:
    """The container's one bucket for a provider, shared by all its sessions and rebuilt clients."""
    with _buckets_lock:
        bucket = _buckets.get(name)
        if bucket is None:
            rate, burst = LIMITS.get(name, (10.0, 20))
            override = os.environ.get(f"RATE_LIMIT_{name.upper()}", "")
            if override:
                left, _, right = override.partition("/")
                rate, burst = float(left), int(right or burst)
            bucket = _buckets[name] = TokenBucket(rate, burst, MAX_WAIT_SECONDS)
        return bucket


def reset_limiters() -> None:
    """Forget every bucket (tests; a changed RATE_LIMIT_* is read again)."""
    with _buckets_lock:
        _buckets.clear()


class _LimitedAdapter(HTTPAdapter):
    def __init__(self, bucket: TokenBucket | None, **kwargs):
        self._bucket = bucket
        super().__init__(**kwargs)

    def send(self, request, **kwargs):
        if self._bucket is not None:
            self._bucket.take()  # before anything is sent: RateLimited means the server saw nothing
        return super().send(request, **kwargs)


def session(retries: Retry, limiter: TokenBucket | None = None) -> requests.Session:
    """A session whose adapter retries as `retries` says (urllib3 backs off between tries) and, given a
    `limiter`, takes one of its tokens per request."""
    s = requests.Session()
    adapter = _LimitedAdapter(limiter, max_retries=retries, pool_maxsize=10)
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
