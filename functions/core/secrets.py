"""Secrets (R-2): environment variables locally, SSM Parameter Store SecureStrings in AWS.

A secret named `TILDA_API_KEY` is read from the environment variable of that name when it is set
(local stack, tests), otherwise from the SSM parameter `/callbridge/{stage}/tilda_api_key` through
Powertools Parameters, decrypted and cached for five minutes. Values are never logged.
"""

from __future__ import annotations

import hmac
import os

SSM_CACHE_SECONDS = 300


class MissingSecret(RuntimeError):
    pass


def get(name: str) -> str:
    value = os.environ.get(name)
    if value:
        return value
    from aws_lambda_powertools.utilities import parameters  # deferred: only AWS stages read SSM

    stage = os.environ.get("CALLBRIDGE_STAGE", "dev")
    path = f"/callbridge/{stage}/{name.lower()}"
    try:
        value = parameters.get_parameter(path, decrypt=True, max_age=SSM_CACHE_SECONDS)
    except parameters.exceptions.GetParameterError:
        raise MissingSecret(f"secret {name} is not set (env {name} or SSM {path})") from None
    if not value:
        raise MissingSecret(f"secret {name} is empty")
    return value


def matches(name: str, presented: str | None) -> bool:
    """Constant-time comparison of a presented credential with the secret; fails closed."""
    if not presented:
        return False
    return hmac.compare_digest(presented.encode(), get(name).encode())
