"""A receiver to try the service with: answers 200 to any method on any path and prints each
request it gets on one line (`manage.py receiver`).

For a person watching a terminal, not for measuring: Python's http.server is plenty for a few
postbacks (the benchmark's receiver, benchmark/receiver.py, is the fast one and prints nothing).
`python3 -m http.server` will not do: it answers 404 to the sample's `/data` and 501 to POST.
"""

import json
import threading
from collections.abc import Callable
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

# Request bodies are read up to this size and printed up to PRINTED_BODY_CHARS: a try-out tool,
# not a sink for floods.
MAX_BODY_BYTES = 1024 * 1024
PRINTED_BODY_CHARS = 2000
ANSWER = b"ok\n"


def request_line(method: str, target: str, headers: dict[str, str], body: bytes) -> str:
    """One request as one line: time, method, path, query, the postback headers, body (quoted
    as JSON, so that a body with line breaks stays on its line)."""
    parts = urlsplit(target)
    fields = [datetime.now().strftime("%H:%M:%S"), method, parts.path or "/", f"query={parts.query!r}"]
    for name in ("X-Postback-Id", "X-Postback-Attempt"):
        if name in headers:
            fields.append(f"{name}={headers[name]}")
    text = body.decode("utf-8", "replace")
    cut = text[:PRINTED_BODY_CHARS] + ("..." if len(text) > PRINTED_BODY_CHARS else "")
    fields.append(f"body={json.dumps(cut, ensure_ascii=False)}" if body else "body=-")
    return " ".join(fields)


def make_handler(print_line: Callable[[str], None]) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()  # one line at a time from the server's threads

    class EchoHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keeps connections open, as delivery reuses them

        def answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self.send_error(413)
                return
            body = self.rfile.read(length) if length else b""
            with lock:
                print_line(request_line(self.command, self.path, dict(self.headers), body))
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(ANSWER)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(ANSWER)

        def __getattr__(self, name: str) -> Any:
            """Every method is answered: http.server looks for `do_<METHOD>`."""
            if name.startswith("do_"):
                return self.answer
            raise AttributeError(name)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the one line above says it all

    return EchoHandler


def make_server(address: str, port: int, print_line: Callable[[str], None]) -> ThreadingHTTPServer:
    """A server listening on address:port (0: a free port; server_address says which)."""
    server = ThreadingHTTPServer((address, port), make_handler(print_line))
    server.daemon_threads = True
    return server
