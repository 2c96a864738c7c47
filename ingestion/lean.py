"""The ingest URLs served ahead of Django's middleware stack: the senders' hot path.

Django's handler runs ten middlewares and resolves the URL for every request: about as much CPU
as the ingest view itself (docs/decisions.md, "The lean ingest path"). For `/ingest.php` and
`/i`, `IngestFirst` (the WSGI application, postbackproject/wsgi.py) calls the view directly,
with what the stack gave these requests kept:

- Django's request signals (database connections closed when too old or broken, as per request
  in Django) and its `django.request` log line for answers of 400 and above;
- the headers the middleware adds to an ingest answer (security headers, the
  Content-Security-Policy, Content-Length), read once per process by running that middleware
  over an empty answer, so they follow MIDDLEWARE and the settings without being written twice.

Requests the stack would answer differently go to Django whole: a Host not in ALLOWED_HOSTS
(400), plain HTTP under SECURE_SSL_REDIRECT (301), and a request asking to be profiled
(X-Profile, postbackproject/profiling.py).
"""

import io
from collections.abc import Callable, Iterable
from typing import Any, cast

from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.core.handlers.base import BaseHandler
from django.core.handlers.exception import convert_exception_to_response
from django.core.handlers.wsgi import WSGIRequest
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse
from django.utils.log import log_response

from ingestion.views import ingest

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

INGEST_PATHS = frozenset({"/ingest.php", "/i"})
# An exception in the view is answered 500 and logged as Django's handler does. (A sync view
# stays sync: the wrapper returns what the view returns.)
view = cast(Callable[[HttpRequest], HttpResponse], convert_exception_to_response(ingest))


class IngestFirst:
    """The WSGI application: the ingest URLs on the lean path, everything else to Django."""

    def __init__(self, django: WSGIApp) -> None:
        self.django = django

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") not in INGEST_PATHS or "HTTP_X_PROFILE" in environ:
            return self.django(environ, start_response)
        request = WSGIRequest(environ)
        if not served_as_the_stack_would(request):
            return self.django(environ, start_response)
        response = answer(request)
        headers = [*response.items(), *stack_headers(request), ("Content-Length", str(len(response.content)))]
        start_response(f"{response.status_code} {response.reason_phrase}", headers)
        # The response is the body: its close(), which the server calls, sends request_finished
        # (database connections too old or broken are closed then, as after any Django request).
        return response


def served_as_the_stack_would(request: HttpRequest) -> bool:
    """Whether the stack would let this request reach the view: an allowed Host, and no
    redirect to HTTPS."""
    try:
        request.get_host()
    except DisallowedHost:
        return False
    return request.is_secure() or not settings.SECURE_SSL_REDIRECT


def answer(request: WSGIRequest) -> HttpResponse:
    """The view's answer, with Django's log line for a refusal."""
    response = view(request)
    if response.status_code >= 400:
        log_response("%s: %s", response.reason_phrase, request.path, response=response, request=request)
    return response


class _EmptyAnswerHandler(BaseHandler):
    """Django's middleware chain around a view that answers an empty 202."""

    def _get_response(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse(status=202, content_type="application/json")


_stack_headers: dict[bool, tuple[tuple[str, str], ...]] = {}


def stack_headers(request: WSGIRequest) -> tuple[tuple[str, str], ...]:
    """The headers MIDDLEWARE adds to an ingest answer, read once for HTTPS and once for HTTP
    (HSTS is sent over HTTPS only)."""
    secure = request.is_secure()
    if secure not in _stack_headers:
        _stack_headers[secure] = read_stack_headers(request)
    return _stack_headers[secure]


def read_stack_headers(request: WSGIRequest) -> tuple[tuple[str, str], ...]:
    """Run MIDDLEWARE over an empty answer to a copy of the request (without its body)."""
    handler = _EmptyAnswerHandler()
    handler.load_middleware()
    copy = WSGIRequest({**request.environ, "wsgi.input": io.BytesIO(), "CONTENT_LENGTH": "0"})
    response = handler.get_response(copy)
    own = {"Content-Type", "Content-Length"}
    return tuple((name, value) for name, value in response.items() if name not in own)


@receiver(setting_changed)
def forget_stack_headers(**kwargs: Any) -> None:
    """MIDDLEWARE and the security settings are read again after a change (tests)."""
    _stack_headers.clear()
