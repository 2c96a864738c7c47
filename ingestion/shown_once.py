"""A secret carried from the POST that made it to the one page that shows it, and no further.

The page that shows a new sender key must answer a GET (post/redirect/get: reloading it must
never issue another key), so the key has to cross one redirect. It is split in two: a random
pad of its length goes to the browser in a short-lived cookie scoped to that page, and the key
XOR the pad to the session. Either half alone is noise, so the session table (or a backup of it)
never holds the key; the first display takes both halves and deletes them, so a reload, another
tab or another browser finds nothing to show.
"""

import base64
import secrets

from django.conf import settings
from django.http import HttpRequest, HttpResponse

# Long enough to survive a slow redirect, short enough that an abandoned half does not linger.
PAD_COOKIE_MAX_AGE_SECONDS = 300
SESSION_KEY_PREFIX = "shown_once:"
COOKIE_PREFIX = "shown_once_"


def keep(request: HttpRequest, response: HttpResponse, name: str, secret: str, path: str) -> None:
    """Hold `secret` for one display at `path`: the masked half in the session, the pad in a
    cookie sent only to that path."""
    plain = secret.encode()
    pad = secrets.token_bytes(len(plain))
    request.session[SESSION_KEY_PREFIX + name] = encode(xor(plain, pad))
    response.set_cookie(
        COOKIE_PREFIX + name,
        encode(pad),
        max_age=PAD_COOKIE_MAX_AGE_SECONDS,
        path=path,
        secure=settings.SESSION_COOKIE_SECURE,
        httponly=True,
        samesite="Strict",
    )


def take(request: HttpRequest, response: HttpResponse, name: str, path: str) -> str | None:
    """The secret kept under `name`, once: both halves are deleted whether or not they match.
    None when it was shown already (or never kept, or its cookie expired)."""
    masked = request.session.pop(SESSION_KEY_PREFIX + name, None)
    pad = request.COOKIES.get(COOKIE_PREFIX + name)
    if pad is not None:
        response.delete_cookie(COOKIE_PREFIX + name, path=path, samesite="Strict")
    if masked is None or pad is None:
        return None
    try:
        plain = xor(decode(masked), decode(pad))
        return plain.decode()
    except ValueError:  # a cookie that is not the pad we sent (edited, or cut): nothing to show
        return None


def xor(data: bytes, pad: bytes) -> bytes:
    if len(data) != len(pad):
        raise ValueError("the pad does not fit the secret")
    return bytes(a ^ b for a, b in zip(data, pad, strict=True))


def encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text.encode())
