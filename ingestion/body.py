"""The ingest request's body, read no further than the size limit, however it was framed."""

from django.http import HttpRequest


def read_body(request: HttpRequest, limit: int) -> bytes | None:
    """The body, or None when it is over the limit (read no further than limit + 1 bytes).

    A chunked body (Transfer-Encoding: chunked) has no Content-Length, and Django reads a body
    without one as empty. Gunicorn de-chunks it and says so with `wsgi.input_terminated`
    (the input ends where the body ends), so the body is read from `wsgi.input` directly."""
    if not request.META.get("CONTENT_LENGTH") and request.META.get("wsgi.input_terminated"):
        return _at_most(request.META["wsgi.input"].read(limit + 1), limit)
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > limit:
        return None
    return _at_most(request.read(limit + 1), limit)


def _at_most(body: bytes, limit: int) -> bytes | None:
    return None if len(body) > limit else body
