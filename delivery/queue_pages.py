"""django-rq's pages (queues, jobs, workers, and the actions that empty, requeue and delete),
behind the permission of admin's "Queues and workers" entry.

django-rq checks only `is_staff` in its views: any staff account, whatever admin lets it see,
could empty the queue (and with it the waiting drain job) or clear the failed jobs. Each of
its URL patterns is served here through `guarded`, which asks for `delivery.view_queuemonitor`
(superusers have it) and keeps the pages' redirects on this site: django-rq's confirm page
redirects to the Referer, and its action form to a `next_url` taken from the request.
"""

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib.auth import get_permission_codename
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.http.response import HttpResponseRedirectBase
from django.urls import URLPattern, reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django_rq import urls as rq_urls

from delivery.models import QueueMonitor

View = Callable[..., HttpResponse]

# The permission that shows "Queues and workers" in admin's index.
VIEW_PERMISSION = f"{QueueMonitor._meta.app_label}.{get_permission_codename('view', QueueMonitor._meta)}"


def may_see_queue_pages(request: HttpRequest) -> bool:
    """Staff with the "Queues and workers" permission (superusers have every permission)."""
    user = request.user
    return user.is_active and user.is_staff and user.has_perm(VIEW_PERMISSION)


def guarded(view: View) -> View:
    """The view for those who may see the queue pages: anonymous visitors are sent to the login
    page, other accounts get 403 before django-rq reads or changes anything."""

    @wraps(view)
    def guarded_view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path(), reverse("admin:login"))
        if not may_see_queue_pages(request):
            raise PermissionDenied
        forget_offsite_referer(request)
        return keep_on_site(request, view(request, *args, **kwargs))

    return guarded_view


def is_on_site(request: HttpRequest, url: str) -> bool:
    """Whether url leads to this site (a relative URL, or this host), never to another."""
    return url_has_allowed_host_and_scheme(url, allowed_hosts={request.get_host()}, require_https=request.is_secure())


def forget_offsite_referer(request: HttpRequest) -> None:
    """django-rq's confirm page carries the Referer into its form as the page to return to."""
    referer = request.META.get("HTTP_REFERER")
    if referer is not None and not is_on_site(request, referer):
        del request.META["HTTP_REFERER"]


def keep_on_site(request: HttpRequest, response: HttpResponse) -> HttpResponse:
    """A redirect elsewhere (a `next_url` posted by another site's form) goes to the queues'
    first page instead."""
    if isinstance(response, HttpResponseRedirectBase) and not is_on_site(request, response.url):
        return HttpResponseRedirect(reverse("django_rq:home"))
    return response


app_name = rq_urls.app_name
# Every django-rq pattern, its API ones (stats.json, metrics) included: no API token is set.
urlpatterns = [
    URLPattern(pattern.pattern, guarded(pattern.callback), pattern.default_args, pattern.name)
    for pattern in rq_urls.urlpatterns
]
