"""WSGI entry point: `gunicorn postbackproject.wsgi:application`: the ingest URLs on their lean
path, the rest through Django's handler."""

import os

from django.core.wsgi import get_wsgi_application

from postbackproject.metricsdir import use_shared_metrics_dir

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "postbackproject.settings")
use_shared_metrics_dir()  # before the app (and prometheus-client) is loaded: it reads the folder then

django_application = get_wsgi_application()

# Loaded once Django is set up (the ingest view imports models).
from ingestion.lean import IngestFirst  # noqa: E402

# The senders' two URLs skip the middleware stack; every other path is Django's (ingestion/lean.py).
application = IngestFirst(django_application)
