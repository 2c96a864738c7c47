"""Settings for the postback delivery service.

Everything that differs between machines comes from the environment (see the README's
configuration table); the defaults run the whole service on one machine: SQLite under
`var/`, the project's own Redis on port 6380. Runtime delivery settings (attempts, backoff,
default value, timeouts) are not here: they live in the database and are edited in admin.
"""

from pathlib import Path

import django_stubs_ext
import environ

# Lets classes such as ModelAdmin[Model] take type parameters at run time, as mypy sees them.
django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"

env = environ.Env()

DEBUG: bool = env.bool("DEBUG", default=False)

# A missing SECRET_KEY is only tolerated while debugging on one's own machine.
SECRET_KEY: str = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise environ.ImproperlyConfigured("Set SECRET_KEY (or DEBUG=true for local development).")
    SECRET_KEY = "insecure-development-key-only-used-with-debug-on"

ALLOWED_HOSTS: list[str] = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS: list[str] = env.list("CSRF_TRUSTED_ORIGINS", default=[])

# HTTPS switches: secure by default in production, overridable one by one.
SECURE_SSL_REDIRECT: bool = env.bool("SECURE_SSL_REDIRECT", default=not DEBUG)
SESSION_COOKIE_SECURE: bool = env.bool("SESSION_COOKIE_SECURE", default=not DEBUG)
CSRF_COOKIE_SECURE: bool = env.bool("CSRF_COOKIE_SECURE", default=not DEBUG)
SECURE_HSTS_SECONDS: int = env.int("SECURE_HSTS_SECONDS", default=0 if DEBUG else 31536000)
# Whether HSTS covers subdomains or asks for preloading is the domain owner's call, not ours:
# off unless set, and Django's reminders about them are silenced.
SECURE_HSTS_INCLUDE_SUBDOMAINS: bool = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD: bool = env.bool("SECURE_HSTS_PRELOAD", default=False)
SILENCED_SYSTEM_CHECKS = ["security.W005", "security.W021"]
# Behind nginx the scheme arrives in X-Forwarded-Proto; trust it only when told to.
if env.bool("USE_X_FORWARDED_PROTO", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# Load balancers probe over plain HTTP on the inside: no redirect to HTTPS for the probe.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_rq",
    "ingestion",
    "delivery",
    "dashboard",
    "benchmark",
]

MIDDLEWARE = [
    # First, so that a profiled request is profiled whole (postbackproject/profiling.py).
    "postbackproject.profiling.ProfileMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Next to Django's own security headers: every response carries the policy below.
    "csp.middleware.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
# Content-Security-Policy on every response (django-csp 4): admin and dashboard pages run and
# style only what static/ serves, so markup injected into a page (a hostile URL or response
# body shown in admin, say) cannot run or load anything. No 'unsafe-inline' anywhere: Django
# admin and the dashboard need none (tests/test_browser.py listens for violations).
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'self'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],  # as X_FRAME_OPTIONS: never framed (clickjacking)
    },
}

ROOT_URLCONF = "postbackproject.urls"
WSGI_APPLICATION = "postbackproject.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}"),
}
if "DATABASE_URL" not in env:
    VAR_DIR.mkdir(exist_ok=True)
# Keep connections between requests; workers also close stale ones between jobs.
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# A host that dies inside a transaction never says so: its PostgreSQL session waits for the
# next statement, holding its locks (the shared rollup rows every worker's recording updates)
# until TCP keepalive gives up, hours later. PostgreSQL ends a session idle in a transaction
# this long (0: never); nothing here stays in a transaction between statements for a second.
DATABASE_IDLE_IN_TRANSACTION_SECONDS: int = env.int("DATABASE_IDLE_IN_TRANSACTION_SECONDS", default=10)
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and DATABASE_IDLE_IN_TRANSACTION_SECONDS:
    database_options = DATABASES["default"].setdefault("OPTIONS", {})
    limit = f"-c idle_in_transaction_session_timeout={DATABASE_IDLE_IN_TRANSACTION_SECONDS * 1000}"
    database_options["options"] = f"{database_options.get('options', '')} {limit}".strip()
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the web process read while a worker writes attempts.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# The dashboard's sign-in (admin's login page admits staff only; analysts need not be staff).
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard:index"

LANGUAGE_CODE = "en-us"
# Times are stored and queried in UTC; pages show them in this zone (the dashboard's days too).
TIME_ZONE: str = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True
# Dates and times are written one way on every page, admin's too: 14:30:05, 2026-12-04 14:30:05.
FORMAT_MODULE_PATH = ["postbackproject.formats"]

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = env.path("STATIC_ROOT", default=VAR_DIR / "static")
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

# --- Queue -------------------------------------------------------------------------------

REDIS_URL: str = env.str("REDIS_URL", default="redis://127.0.0.1:6380/0")


# High availability: with Sentinel, every process finds the current master through these
# sentinels (host:port,host:port,...) instead of REDIS_URL, and follows a failover without a
# restart. REDIS_PASSWORD is the master's and replicas' password, REDIS_SENTINEL_PASSWORD the
# sentinels' own (empty: none). docs/operations.md, "High availability".
def _host_ports(name: str) -> list[tuple[str, int]]:
    """host:port,host:port,... from the environment."""
    return [(host, int(port)) for host, _, port in (item.rpartition(":") for item in env.list(name, default=[]))]


REDIS_SENTINELS: list[tuple[str, int]] = _host_ports("REDIS_SENTINELS")
REDIS_SENTINEL_MASTER: str = env.str("REDIS_SENTINEL_MASTER", default="postback")
REDIS_PASSWORD: str = env.str("REDIS_PASSWORD", default="")
REDIS_SENTINEL_PASSWORD: str = env.str("REDIS_SENTINEL_PASSWORD", default="")
REDIS_DB: int = env.int("REDIS_DB", default=0)
# Replicas that must hold an ingest request before it is answered 202 (WAIT): with 1, a 202'd
# postback survives the master's sudden death. 0 (default): replication is asynchronous.
REDIS_WAIT_FOR_REPLICAS: int = env.int("REDIS_WAIT_FOR_REPLICAS", default=0)
REDIS_WAIT_TIMEOUT_MS: int = env.int("REDIS_WAIT_TIMEOUT_MS", default=1000)
# Redis Cluster: host:port,... of some of its nodes (the client finds the rest, and follows a
# failover or a slot's move without a restart). Every process then keeps the inbox, due tries,
# drainers' leases, circuits and rate limits on the cluster; RQ's own keys (the drain jobs'
# queue, the workers' registrations) stay on REDIS_URL or the sentinels' master, because RQ 2
# moves jobs between keys of different hash slots. docs/operations.md, "Redis Cluster".
REDIS_CLUSTER_NODES: list[tuple[str, int]] = _host_ports("REDIS_CLUSTER_NODES")
# Streams the inbox is sharded into, each on one hash slot (so on one master of a cluster, and
# one Redis core): one shard carries about 19,000-29,500 postbacks a second of sample-shaped
# traffic (docs/scaling.md). Changing it on a live system loses nothing: old shards are drained,
# then dropped. Every shard needs a drainer: run at least this many workers.
INBOX_SHARDS: int = env.int("INBOX_SHARDS", default=1)
if INBOX_SHARDS < 1:
    raise environ.ImproperlyConfigured(f"INBOX_SHARDS must be 1 or more, not {INBOX_SHARDS}")
POSTBACK_QUEUE = "postbacks"
_QUEUE_CONNECTION: dict[str, object] = (
    {
        "SENTINELS": REDIS_SENTINELS,
        "MASTER_NAME": REDIS_SENTINEL_MASTER,
        "DB": REDIS_DB,
        "PASSWORD": REDIS_PASSWORD or None,
        "SOCKET_TIMEOUT": 30,
        "SENTINEL_KWARGS": {"password": REDIS_SENTINEL_PASSWORD or None, "socket_timeout": 2},
    }
    if REDIS_SENTINELS
    else {"URL": REDIS_URL}
)
RQ_QUEUES = {
    POSTBACK_QUEUE: {
        **_QUEUE_CONNECTION,
        "SERIALIZER": "postbackproject.queue.CompactJSONSerializer",
    },
}
# django-rq's own admin entry reads "DJANGO_RQ / Django-RQ" with a "Change" link; delivery's
# admin lists the same pages as "Queues and workers" instead.
RQ_SHOW_ADMIN_LINK = False
RQ = {
    # `manage.py rqworker` builds this worker: no fork per job, stale DB connections
    # closed between jobs, and the JSON serializer whatever the command line says.
    "WORKER_CLASS": "delivery.worker.DeliveryWorker",
    "QUEUE_CLASS": "delivery.worker.DeliveryQueue",
    "JOB_CLASS": "delivery.worker.DeliveryJob",
    "COMMIT_MODE": "auto",
}
# How many inbox entries (requests, or batch_size pieces of larger ones) may wait before
# ingestion answers 503.
INGEST_MAX_QUEUED_JOBS: int = env.int("INGEST_MAX_QUEUED_JOBS", default=100_000)
# How often each web process re-reads Redis's memory use (seconds).
INGEST_BACKLOG_CHECK_SECONDS: float = env.float("INGEST_BACKLOG_CHECK_SECONDS", default=1.0)

# --- Ingestion ---------------------------------------------------------------------------

INGEST_MAX_BODY_BYTES: int = env.int("INGEST_MAX_BODY_BYTES", default=1024 * 1024)
INGEST_MAX_DATA_OBJECTS: int = env.int("INGEST_MAX_DATA_OBJECTS", default=10_000)
# The work one request may ask of a worker, and what it may make the service store: the
# placeholders in its URL template, and the bytes of all its postbacks once rendered (every
# URL, and every body for POST/PUT/PATCH). Over either: 400 naming it. A request at these
# limits costs a worker up to about half a second of CPU, made 10 ms a turn of its loop
# (`manage.py requestcosts`, docs/decisions.md).
INGEST_MAX_PLACEHOLDERS: int = env.int("INGEST_MAX_PLACEHOLDERS", default=64)
INGEST_MAX_RENDERED_BYTES: int = env.int("INGEST_MAX_RENDERED_BYTES", default=16 * 1024 * 1024)
# Known senders (README, "Known senders"): when true, a request without a valid sender key is
# refused with 401; when false, keyless requests are served and only a wrong key is refused.
INGEST_REQUIRE_SENDER_KEY: bool = env.bool("INGEST_REQUIRE_SENDER_KEY", default=False)
# Requests per second, up to that many at once, per sender key (unless the key sets its own)
# and per client address for requests without a key; 0: no limit. Off by default: a 429 loses
# the postback of a sender that does not retry, so limits are set knowing the senders.
INGEST_RATE_LIMIT_PER_KEY: float = env.float("INGEST_RATE_LIMIT_PER_KEY", default=0.0)
INGEST_RATE_LIMIT_PER_ADDRESS: float = env.float("INGEST_RATE_LIMIT_PER_ADDRESS", default=0.0)
# Proxies (CIDRs) whose X-Real-IP / X-Forwarded-For name the client: a request from any other
# peer is counted, limited and logged by the peer's own address, whatever it claims. Empty by
# default: reached directly (the local run), no header can choose the address the per-address
# limit counts. Production's nginx on loopback is listed (deploy/provision.sh). gunicorn
# believes X-Forwarded-Proto from the same list (deploy/gunicorn.conf.py).
TRUSTED_PROXIES: list[str] = env.list("TRUSTED_PROXIES", default=[])

# --- Delivery ----------------------------------------------------------------------------

# Private, loopback and link-local destinations are refused unless listed here (CIDRs).
DELIVERY_ALLOW_NETWORKS: list[str] = env.list("DELIVERY_ALLOW_NETWORKS", default=[])
# PEM file of the certificate authorities that receivers' HTTPS certificates are checked
# against; empty: the public ones (certifi). For receivers behind a private CA.
DELIVERY_CA_BUNDLE: str = env.str("DELIVERY_CA_BUNDLE", default="")
# Requests one worker process keeps in flight at once (libcurl connections on one thread).
# Sized for slow receivers: 1,000 postbacks/s to receivers answering in 1 s need 1,000 in
# flight. Each costs a descriptor and some memory (docs/performance.md, "Memory in flight").
DELIVERY_CONCURRENCY: int = env.int("DELIVERY_CONCURRENCY", default=1024)
# Connections a worker keeps open for reuse beyond those in use. Each is a descriptor and some
# memory (about 8 KB over HTTP, 100 KB over HTTPS); each one missing costs the next request to
# its host a new connection (about 0.3 ms of CPU over HTTP, 2-3 ms over HTTPS, measured in
# docs/performance.md). Size it to the hosts that come back within a couple of minutes.
DELIVERY_IDLE_CONNECTIONS: int = env.int("DELIVERY_IDLE_CONNECTIONS", default=2048)
# A drain job leaves after this long idle (a lone postback arriving within it goes out at
# once, without starting a job), and hands over to a fresh job after DRAINER_MAX_SECONDS, so
# that no RQ job runs unbounded (a warm shutdown does not wait for it: drainers stop at once).
DELIVERY_DRAINER_IDLE_SECONDS: float = env.float("DELIVERY_DRAINER_IDLE_SECONDS", default=2.0)
DELIVERY_DRAINER_MAX_SECONDS: float = env.float("DELIVERY_DRAINER_MAX_SECONDS", default=300.0)
# A warm shutdown (SIGTERM) waits this long at most for requests in flight; the rest are cut
# off and sent again by another drainer. The local run sets 4, for a quick Ctrl-C.
DELIVERY_STOP_GRACE_SECONDS: float = env.float("DELIVERY_STOP_GRACE_SECONDS", default=20.0)
# How often an idle worker moves due retries into the inbox and checks for orphaned work.
DELIVERY_WORKER_POLL_SECONDS: float = env.float("DELIVERY_WORKER_POLL_SECONDS", default=1.0)
# How long a worker trusts its copy of the admin-edited delivery settings.
DELIVERY_SETTINGS_CACHE_SECONDS: float = env.float("DELIVERY_SETTINGS_CACHE_SECONDS", default=5.0)

# --- History ----------------------------------------------------------------------------

# `manage.py prunehistory` (daily, postback-prune.timer) deletes attempts older than this...
ATTEMPT_RETENTION_DAYS: int = env.int("ATTEMPT_RETENTION_DAYS", default=30)
# ...per-minute rollups older than this (the dashboard then draws such times by the hour)...
MINUTE_ROLLUP_RETENTION_DAYS: int = env.int("MINUTE_ROLLUP_RETENTION_DAYS", default=35)
# ...and hourly rollups and accepted counts older than this.
ROLLUP_RETENTION_DAYS: int = env.int("ROLLUP_RETENTION_DAYS", default=400)

# --- Monitoring ---------------------------------------------------------------------------

# /metrics answers only requests with "Authorization: Bearer <this>"; unset, it is a 404.
# A request carrying "X-Profile: <this>" is profiled (postbackproject/profiling.py).
METRICS_TOKEN: str = env.str("METRICS_TOKEN", default="")
# Traces (postbackproject/tracing.py), on as the OpenTelemetry conventions say: when an OTLP
# endpoint is set, unless OTEL_SDK_DISABLED is "true". The exporter reads the other OTEL_*
# variables (headers, protocol details, sampler, OTEL_SERVICE_NAME) itself.
OTEL_TRACES: bool = (
    bool(
        env.str("OTEL_EXPORTER_OTLP_ENDPOINT", default="") or env.str("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", default="")
    )
    and env.str("OTEL_SDK_DISABLED", default="").strip().lower() != "true"
)
# Where profiles of requests and drain jobs are written.
PROFILE_DIR = Path(env.str("PROFILE_DIR", default=str(VAR_DIR / "profiles")))

# --- Logging -----------------------------------------------------------------------------

LOG_LEVEL: str = env.str("LOG_LEVEL", default="INFO")
# "json": every log line is one JSON object (production, for a log pipeline); "text": readable
# lines for a person at a terminal (the local run). Delivery attempts and ingest requests are
# one JSON object per line either way: they are the service's records.
LOG_FORMAT: str = env.str("LOG_FORMAT", default="text")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "text": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": ["asctime", "levelname", "name", "message"],
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        },
        # Event lines are JSON already; print them as they are.
        "bare": {"format": "%(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "json" if LOG_FORMAT == "json" else "text"},
        "events": {"class": "logging.StreamHandler", "formatter": "bare"},
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "delivery.attempts": {"handlers": ["events"], "level": "INFO", "propagate": False},
        "ingestion.requests": {"handlers": ["events"], "level": "INFO", "propagate": False},
    },
}
