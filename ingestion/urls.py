from django.urls import path

from ingestion import views

urlpatterns = [
    path("ingest.php", views.ingest, name="ingest"),
    path("i", views.ingest, name="ingest-short"),
    path("openapi.yaml", views.openapi, name="openapi"),
]
