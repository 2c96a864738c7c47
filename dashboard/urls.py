from django.urls import path

from dashboard import views

app_name = "dashboard"
urlpatterns = [
    path("", views.index, name="index"),
    path("postbacks/", views.postback_lookup, name="postback_lookup"),
    path("postbacks/<str:postback_id>/", views.postback, name="postback"),
    path("api/volume", views.volume, name="volume"),
    path("api/success", views.success, name="success"),
    path("api/latency", views.latency, name="latency"),
    path("api/codes", views.codes, name="codes"),
    path("api/hosts", views.hosts, name="hosts"),
    path("api/failures", views.failures, name="failures"),
    path("api/live", views.live_figures, name="live"),
]
