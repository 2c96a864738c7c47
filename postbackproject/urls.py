"""URL routes: ingestion at the root (the senders' contract), dashboards and admin behind a login."""

from django.contrib import admin
from django.urls import include, path

from postbackproject import views

urlpatterns = [
    path("", include("ingestion.urls")),  # first: the senders' hot path is matched before all else
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.metrics, name="metrics"),
    path("dashboard/", include("dashboard.urls")),
    path("admin/rq/", include("django_rq.urls")),
    path("admin/", admin.site.urls),
]
