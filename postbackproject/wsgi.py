"""WSGI entry point: `gunicorn postbackproject.wsgi:application`."""

import os

from django.core.wsgi import get_wsgi_application

from postbackproject.metricsdir import use_shared_metrics_dir

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "postbackproject.settings")
use_shared_metrics_dir()  # before the app (and prometheus-client) is loaded: it reads the folder then

application = get_wsgi_application()
