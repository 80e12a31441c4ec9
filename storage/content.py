"""Content addressing of observed item data.

An observation stores the hash of its data; the data itself is stored once per
distinct value in ``contents``. A run that sees an item unchanged therefore
adds one narrow row (run, key, hash), never another copy of the data, and two
observations are equal exactly when their hashes are.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

HASH_CHARS = 32  # 128-bit BLAKE2b, hex


# json.dumps with these arguments builds an encoder per call: a third of the hash's time.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
# And JSONEncoder.encode builds a C encoder per call: half of what is left. This is
# the one it builds (same arguments, so the same text), made once; no circular
# check, as data parsed from JSON has no cycles.
_make_encoder = getattr(json.encoder, "c_make_encoder", None)  # not in typeshed
_C_CANONICAL = (
    None
    if _make_encoder is None
    else _make_encoder(
        None,
        _CANONICAL.default,
        json.encoder.encode_basestring,
        None,
        _CANONICAL.key_separator,
        _CANONICAL.item_separator,
        True,
        False,
        True,
    )
)


def canonical_json(data: Any) -> str:
    """The one serialisation hashed: sorted keys, no whitespace, UTF-8 text."""
    if _C_CANONICAL is None:  # pragma: no cover - a Python without the C json module
        return _CANONICAL.encode(data)
    return "".join(_C_CANONICAL(data, 0))


def content_hash(data: Any) -> str:
    """The content address of ``data`` (equal data, equal hash, on every backend)."""
    digest = hashlib.blake2b(canonical_json(data).encode("utf-8"), digest_size=HASH_CHARS // 2)
    return digest.hexdigest()
