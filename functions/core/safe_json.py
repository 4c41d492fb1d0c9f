"""JSON from outside, parsed so that hostile documents are a clear ValueError, never a crash or a 5xx.

Python's parser recurses (deep nesting raises RecursionError, not ValueError), converts any number of
digits (past 4300 a ValueError from int(), and slow before that), and keeps lone surrogate escapes
(`"\\ud800"`) that no UTF-8 encoder accepts later, when the data is hashed or stored.
"""

from __future__ import annotations

import json
import re

MAX_DEPTH = 32
MAX_NUMBER_DIGITS = 100
_SURROGATES = re.compile("[\ud800-\udfff]")


class BadJson(ValueError):
    """The document is not JSON we accept; the message says why."""


def _int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise BadJson(f"a JSON number has more than {MAX_NUMBER_DIGITS} digits")
    return int(digits)


def _checked(node, depth: int = 1):
    if depth > MAX_DEPTH:
        raise BadJson(f"JSON nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, str):
        return _SURROGATES.sub("\ufffd", node)
    if isinstance(node, dict):
        return {_SURROGATES.sub("\ufffd", k): _checked(v, depth + 1) for k, v in node.items()}
    if isinstance(node, list):
        return [_checked(v, depth + 1) for v in node]
    return node


def loads(text: str | bytes):
    """Like json.loads, within MAX_DEPTH and MAX_NUMBER_DIGITS, lone surrogates replaced by U+FFFD."""
    try:
        return _checked(json.loads(text, parse_int=_int))
    except BadJson:
        raise
    except RecursionError:
        raise BadJson(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError):
        raise BadJson("not valid JSON") from None
