"""``API_POST_HEADERS``: extra static headers for every POST (an API gateway key, a tenant id, ...).

Two spellings, whichever is easier to quote where the variable is set::

    API_POST_HEADERS=X-Api-Key: 0123abcd; X-Tenant: acme
    API_POST_HEADERS='{"X-Api-Key": "0123abcd", "X-Tenant": "acme"}'

Header values are secrets: error messages name the variable and the header, never the value, and every
log redacts them (``Config.secrets()``). Headers the shipper sets itself cannot be overridden.
"""

from __future__ import annotations

import json
import re

from ..errors import ConfigError

# RFC 9110 "token": what a header name may be made of.
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Set by the shipper or by HTTP itself; a static value would corrupt the request.
RESERVED = frozenset({
    "content-type", "content-length", "content-encoding", "transfer-encoding", "host", "connection",
    "idempotency-key", "expect", "te", "trailer", "upgrade",
})
SYNTAX = '"Name: value; Name2: value2" or a JSON object {"Name": "value"}'


def parse_post_headers(name: str, raw: str, *, auth_token_set: bool) -> tuple[tuple[str, str], ...]:
    """The variable's text → ``((header, value), ...)``; raises ConfigError (never quoting a value)."""
    text = raw.strip()
    if not text:
        return ()
    pairs: list[tuple[str, str]] = []
    if text.startswith("{"):
        try:
            loaded = json.loads(text)
        except ValueError:
            raise ConfigError(name, f"looks like JSON but does not parse; expected {SYNTAX}") from None
        if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
            raise ConfigError(name, "the JSON object must map header names to string values")
        pairs = [(str(k).strip(), v.strip()) for k, v in loaded.items()]
    else:
        for position, entry in enumerate((e for e in text.split(";") if e.strip()), start=1):
            header, colon, value = entry.partition(":")
            if not colon:
                raise ConfigError(name, f"entry {position} has no ':'; expected {SYNTAX}")
            pairs.append((header.strip(), value.strip()))
    seen: set[str] = set()
    for header, value in pairs:
        if not _TOKEN.match(header):
            shown = header if len(header) <= 40 and header.isprintable() else "(unprintable)"
            raise ConfigError(name, f"{shown!r} is not a valid header name (letters, digits and !#$%&'*+.^_`|~-)")
        lower = header.lower()
        if lower in RESERVED:
            raise ConfigError(name, f"{header} is set by the shipper itself and cannot be overridden")
        if lower == "authorization" and auth_token_set:
            raise ConfigError(name, "Authorization is already set by API_POST_AUTH_TOKEN; use one or the other")
        if lower in seen:
            raise ConfigError(name, f"{header} is given twice")
        seen.add(lower)
        if not value:
            raise ConfigError(name, f"{header} has an empty value")
        if any(ord(ch) < 32 and ch != "\t" or ord(ch) == 127 or ord(ch) > 126 for ch in value):
            raise ConfigError(name, f"the value of {header} contains control or non-ASCII characters")
    return tuple(pairs)
