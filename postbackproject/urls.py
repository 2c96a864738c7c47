"""URL routes: ingestion at the root (the senders' contract), dashboards and admin behind a login."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path, reverse_lazy
from django.views.generic import RedirectView

from postbackproject import views

# One name on every page, the dashboard's login included (it is admin's login page); "View
# site" and "/" lead to the dashboard.
admin.site.site_header = "Postback delivery"
admin.site.site_title = "Postback delivery"
admin.site.index_title = "Administration"
admin.site.site_url = "/dashboard/"
# The sidebar repeats the index on every page and takes a quarter of a 1280 px screen, which
# the attempt list needs for its columns.
admin.site.enable_nav_sidebar = False

urlpatterns = [
    path("", include("ingestion.urls")),  # first: the senders' hot path is matched before all else
    path("", RedirectView.as_view(url=reverse_lazy("dashboard:index")), name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.metrics, name="metrics"),
    # Anyone with an account signs in here for the dashboard; admin's own login admits staff only.
    path(
        "login/",
        auth_views.LoginView.as_view(
            template_name="admin/login.html",
            redirect_authenticated_user=True,
            extra_context={
                "site_header": admin.site.site_header,
                "site_title": admin.site.site_title,
                "title": "Log in",
            },
        ),
        name="login",
    ),
    path("dashboard/", include("dashboard.urls")),
    # django-rq's pages, behind the "Queues and workers" permission (not just is_staff).
    path("admin/rq/", include("delivery.queue_pages")),
    path("admin/", admin.site.urls),
]
