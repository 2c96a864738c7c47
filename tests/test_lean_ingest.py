"""The ingest URLs are served ahead of Django's middleware stack (ingestion/lean.py), and
answer as the stack did: the same headers, and what the stack alone decides still decided."""

import io
import json
from collections.abc import Callable
from typing import Any

import pytest
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.http import HttpRequest, HttpResponse

from ingestion.lean import IngestFirst
from ingestion.views import json_line
from postbackproject import wsgi

pytestmark = pytest.mark.django_db

SAMPLE = {"endpoint": {"method": "GET", "url": "https://example.com/p?k={key}"}, "data": [{"key": "a"}]}
# Paths the recording middleware below saw a request for.
seen: list[str] = []


class Recording:
    """A middleware that notes every request it sees."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        seen.append(request.path)
        return self.get_response(request)


def send(app: Any, method: str, path: str, body: bytes = b"", **extra: str) -> tuple[int, dict[str, str], bytes]:
    """Call a WSGI application as gunicorn does: its status, headers and body."""
    environ = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "localhost",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": io.StringIO(),
        **extra,
    }
    answered: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        answered.update(status=int(status.split()[0]), headers=dict(headers))

    # As Django's test client does: the test's database connection stays open.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        result = app(environ, start_response)
        content = b"".join(result)
        result.close()
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)
    return answered["status"], answered["headers"], content


def recorded(settings) -> IngestFirst:
    """The WSGI entry point, built as postbackproject/wsgi.py builds it, with a middleware first
    in the stack that notes what reaches the stack. (The lean path runs the stack once, over an
    empty answer, to read the headers it adds: done here, before anything is noted.)"""
    settings.MIDDLEWARE = ["tests.test_lean_ingest.Recording", *settings.MIDDLEWARE]
    app = IngestFirst(WSGIHandler())
    send(app, "GET", "/i")
    seen.clear()
    return app


def test_the_entry_point_serves_ingestion_first():
    assert isinstance(wsgi.application, IngestFirst)


@pytest.mark.parametrize("path", ["/ingest.php", "/i"])
def test_an_ingest_request_is_answered_without_passing_through_the_middleware(settings, path):
    app = recorded(settings)

    status, _, body = send(app, "POST", path, json.dumps(SAMPLE).encode())

    assert status == 202
    assert json.loads(body)["accepted"] == 1
    assert seen == []


def test_every_other_path_still_passes_through_the_middleware(settings):
    status, _, _ = send(recorded(settings), "GET", "/healthz")

    assert status == 200
    assert seen == ["/healthz"]


@pytest.mark.parametrize(
    ("method", "body", "status"),
    [("POST", json.dumps(SAMPLE).encode(), 202), ("POST", b"{", 400), ("GET", b"", 405)],
)
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_an_ingest_answer_carries_the_headers_the_stack_gave_it(method, body, status, scheme):
    lean = send(wsgi.application, method, "/i", body, **{"wsgi.url_scheme": scheme})
    stack = send(wsgi.django_application, method, "/i", body, **{"wsgi.url_scheme": scheme})

    assert lean[0] == stack[0] == status
    assert lean[1] == stack[1]
    assert "Content-Security-Policy" in lean[1]
    assert lean[1]["X-Content-Type-Options"] == "nosniff"
    assert ("Strict-Transport-Security" in lean[1]) == (scheme == "https")


def test_a_host_not_allowed_is_refused_by_the_stack_as_before(settings):
    status, _, _ = send(recorded(settings), "POST", "/i", json.dumps(SAMPLE).encode(), HTTP_HOST="evil.example")

    assert status == 400
    assert seen == ["/i"]


def test_plain_http_is_still_sent_to_https_when_redirects_are_on(settings):
    settings.SECURE_SSL_REDIRECT = True

    status, headers, _ = send(recorded(settings), "POST", "/i", json.dumps(SAMPLE).encode())

    assert status == 301
    assert headers["Location"] == "https://localhost/i"


def test_a_request_asking_to_be_profiled_is_profiled_by_the_stack(settings, tmp_path):
    settings.METRICS_TOKEN = "a-token"
    settings.PROFILE_DIR = tmp_path

    status, _, _ = send(recorded(settings), "POST", "/i", json.dumps(SAMPLE).encode(), HTTP_X_PROFILE="a-token")

    assert status == 202
    assert seen == ["/i"]
    assert list(tmp_path.glob("*.html"))


def test_a_refusal_is_logged_by_django_as_before(caplog):
    with caplog.at_level("WARNING", logger="django.request"):
        send(wsgi.application, "POST", "/i", b"{")

    assert [record.getMessage() for record in caplog.records if record.name == "django.request"] == ["Bad Request: /i"]


def test_a_log_line_orjson_refuses_is_written_all_the_same():
    fields = {"event": "ingest", "error": "bad value '\ud800'"}

    assert json.loads(json_line(fields)) == fields
