"""The test client, serving the ingest URLs as the WSGI entry point does: on the lean path
(ingestion/lean.py), so that every test that sends to them tests the path production serves.
Every other request (and an ingest request the lean path hands over) goes through Django's
test handler as before."""

from collections.abc import Iterable
from typing import Any

from django.core.handlers.wsgi import WSGIRequest
from django.core.signals import request_finished
from django.db import close_old_connections
from django.http import HttpResponse
from django.test import Client
from django.test.client import ClientHandler

from ingestion.lean import IngestFirst


class HandedOver(Exception):
    """The lean path passed the request on to Django's stack."""


def to_django(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    raise HandedOver


class LeanPathHandler(ClientHandler):
    lean = IngestFirst(to_django)

    def __call__(self, environ: dict[str, Any]) -> Any:  # an HttpResponse, as the test client wants
        answered: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            answered.update(status=int(status.split()[0]), headers=headers)

        # As Django's test handler does: the test's database connection stays open.
        request_finished.disconnect(close_old_connections)
        try:
            body = self.lean(environ, start_response)
            content = b"".join(body)
            body.close()  # type: ignore[attr-defined]  # the lean path answers an HttpResponse
        except HandedOver:
            return super().__call__(environ)
        finally:
            request_finished.connect(close_old_connections)
        response = HttpResponse(content, status=answered["status"])
        del response["Content-Type"]
        for name, value in answered["headers"]:
            response[name] = value
        response.wsgi_request = WSGIRequest(environ)  # type: ignore[attr-defined]
        return response


class LeanPathClient(Client):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handler = LeanPathHandler(self.handler.enforce_csrf_checks)
