"""Test settings: the production settings, fed the environment a test run needs.

Delivery tests talk to receivers on loopback, so loopback is allowed; settings edits must be
seen at once. The Redis URL is filled in by the suite once it has started its own server.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("SECRET_KEY", "test-only-not-secret")
os.environ.setdefault("DELIVERY_ALLOW_NETWORKS", "127.0.0.0/8")
os.environ.setdefault("DELIVERY_SETTINGS_CACHE_SECONDS", "0")
os.environ.setdefault("SECURE_SSL_REDIRECT", "false")
os.environ.setdefault("DELIVERY_CONCURRENCY", "4")
os.environ.setdefault("INGEST_BACKLOG_CHECK_SECONDS", "0")
# A burst worker's drain job leaves as soon as the inbox is empty.
os.environ.setdefault("DELIVERY_DRAINER_IDLE_SECONDS", "0")
# A test in a transaction (pytest-django's) may wait longer than production's limit on idle
# transactions between two statements; tests/test_machines.py gives its hosts the default.
os.environ.setdefault("DATABASE_IDLE_IN_TRANSACTION_SECONDS", "0")

# Every process the suite starts counts into one folder, as web and workers do in production
# (set before prometheus-client is first imported: it reads it then).
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="postback-test-metrics-")
    atexit.register(shutil.rmtree, os.environ["PROMETHEUS_MULTIPROC_DIR"], True)

from postbackproject.settings import *  # noqa: F403

# Hashing test users' passwords slowly buys nothing.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STORAGES = {**STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}  # noqa: F405

# Worker processes started by the suite share its database: on SQLite, a file (in memory it
# would be the suite's alone).
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":  # noqa: F405
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test-db.sqlite3")}  # noqa: F405
