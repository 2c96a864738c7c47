"""Standard Webhooks signatures on outgoing postbacks (https://www.standardwebhooks.com).

A receiver holding a `whsec_` secret checks that a request came from this service and was not
replayed long after: the signature covers the postback id, the time the attempt was sent and
the exact body bytes. With two secrets active (during a rotation) each request carries one
signature per secret, and a receiver that knows either accepts it.

Pure functions only: the worker passes the secrets it loaded with its settings, so signing
costs no database query and two HMACs at most per request.
"""

import base64
import hashlib
import hmac
from collections.abc import Sequence
from functools import lru_cache
from secrets import token_bytes

SECRET_PREFIX = "whsec_"
# The specification asks for at least 24 random bytes; 32 match SHA-256's own 256 bits.
SECRET_BYTES = 32


def new_secret() -> str:
    """A fresh secret in the form receivers' libraries expect: `whsec_` + base64 of the key."""
    return SECRET_PREFIX + base64.b64encode(token_bytes(SECRET_BYTES)).decode("ascii")


@lru_cache(maxsize=16)
def secret_key(secret: str) -> bytes:
    """The HMAC key inside a `whsec_` secret (decoded once per process: secrets rarely change)."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)


def sign(key: bytes, postback_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,` signature: base64 HMAC-SHA256 over `{id}.{timestamp}.{body}`."""
    signed = b"%s.%d.%s" % (postback_id.encode(), timestamp, body)
    return "v1," + base64.b64encode(hmac.digest(key, signed, hashlib.sha256)).decode("ascii")


def signature_headers(postback_id: str, timestamp: int, body: bytes, secrets: Sequence[str]) -> list[str]:
    """The three header lines of a signed request, one signature per secret (space-separated)."""
    signatures = " ".join(sign(secret_key(secret), postback_id, timestamp, body) for secret in secrets)
    return [
        f"webhook-id: {postback_id}",
        f"webhook-timestamp: {timestamp}",
        f"webhook-signature: {signatures}",
    ]
