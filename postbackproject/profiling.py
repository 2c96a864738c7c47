"""Profile one request or one drain job with pyinstrument, for an engineer chasing a slow path.

- A request: send it with the header `X-Profile: <METRICS_TOKEN>`. The web process profiles
  that request only.
- A drain job: `manage.py profilejob` asks for it; the next drain job any worker starts is
  profiled (`PROFILE_NEXT_JOB` in Redis, taken once).

Each report is written to PROFILE_DIR as HTML (open it in a browser) and text, named by time
and what was profiled. Profiling costs CPU for that one request or job only.
"""

import hmac
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from pyinstrument import Profiler

from postbackproject.keys import PROFILE_NEXT_JOB
from postbackproject.queue import get_connection


@contextmanager
def profiled(label: str) -> Iterator[None]:
    """Profile the block; write its report to PROFILE_DIR."""
    profiler = Profiler(interval=0.001)
    profiler.start()
    try:
        yield
    finally:
        profiler.stop()
        write_report(profiler, label)


def write_report(profiler: Profiler, label: str) -> Path:
    folder = Path(settings.PROFILE_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{re.sub(r'[^A-Za-z0-9._-]+', '_', label)[:80]}"
    stem.with_suffix(".html").write_text(profiler.output_html(), encoding="utf-8")
    stem.with_suffix(".txt").write_text(profiler.output_text(unicode=True, color=False), encoding="utf-8")
    return stem.with_suffix(".html")


def profile_next_job() -> None:
    get_connection().set(PROFILE_NEXT_JOB, "1", ex=24 * 3600)


def job_is_to_be_profiled() -> bool:
    return get_connection().getdel(PROFILE_NEXT_JOB) is not None


class ProfileMiddleware:
    """Profiles a request that carries `X-Profile: <METRICS_TOKEN>`; others pass untouched."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        asked = request.headers.get("X-Profile")
        token = settings.METRICS_TOKEN
        if not asked or not token or not hmac.compare_digest(asked.encode(), token.encode()):
            return self.get_response(request)
        with profiled(f"request-{request.method}-{request.path}"):
            return self.get_response(request)
