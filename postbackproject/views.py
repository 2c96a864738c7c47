"""Operations endpoints that belong to no app: the process's own health."""

from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_safe


@require_safe
def healthz(request: HttpRequest) -> HttpResponse:
    """200 while the process can answer at all: no database, no Redis.

    Load balancers take a process out on this; it must not fail because a dependency is down
    (that is /readyz's question), and it is the benchmark's floor for a Django response.
    """
    return HttpResponse(b"ok\n", content_type="text/plain")
