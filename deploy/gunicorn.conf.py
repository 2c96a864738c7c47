"""Gunicorn settings for the postback web process (ingestion, dashboard, admin).

Used by deploy/local-processes.py (the local run) and postback-web.service:
    gunicorn postbackproject.wsgi:application -c deploy/gunicorn.conf.py
Every knob below can be overridden on the command line; the environment variables named
here are the ones meant to differ between machines.
"""

import multiprocessing
import os
from typing import Any

from postbackproject.addresses import parse_networks
from postbackproject.metricsdir import use_shared_metrics_dir

# Before prometheus-client is imported (it reads the folder then), here in the master and so
# in every worker it forks: all count where /metrics reads (postbackproject/metricsdir.py).
use_shared_metrics_dir()

from prometheus_client import multiprocess  # noqa: E402

# Where to listen. Loopback only: nginx is the public face in production (it buffers slow
# clients, each of which would otherwise hold a thread below), and locally nothing else needs it.
bind = [os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")]

# Processes. Requests are short (parse, validate, one pipelined Redis round trip), so the
# classic 2 x cores + 1 keeps the CPUs busy while some workers wait on Redis or the database.
workers = int(os.environ.get("WEB_CONCURRENCY", 2 * multiprocessing.cpu_count() + 1))

# Threads in each process (gunicorn's gthread worker), and as many connections as threads.
# A sync worker reads a request's body itself, so a client trickling its body holds the whole
# process: two such clients stopped a two-process local run for 30 s. Here each holds one
# thread; a process takes only the connections it has a free thread for, and the rest wait
# in the kernel's queue for any process that has one, so it takes processes x threads slow
# clients to stop the web (with more connections than threads, a process accepts requests
# it cannot start, and 8 slow clients stopped 2 x 8 threads). Production has nginx in front,
# which reads whole bodies before passing them on; the local run has not. Threads do not
# slow ingestion (docs/decisions.md, "gthread"), but each one that touches the database
# keeps its own connection: processes x threads at most.
#
# Behind nginx (production) no slow client reaches gunicorn, and the sync worker answers 22-48 %
# more requests a second on two cores (docs/decisions.md, "gthread"): postback-web.service sets
# GUNICORN_WORKER_CLASS=sync. gunicorn turns a sync worker with threads into gthread, so the
# sync worker gets one thread.
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "gthread")
threads = int(os.environ.get("GUNICORN_THREADS", 8)) if worker_class == "gthread" else 1
worker_connections = threads

# A worker whose main loop does not check in for this long is stuck: the master kills and
# replaces it. (With threads this no longer bounds one request: a stuck thread is not noticed.)
# nginx's proxy_read_timeout is set a little above it.
timeout = 30

# On SIGTERM / SIGHUP, workers get this long to finish the requests they hold. systemd's
# TimeoutStopSec for postback-web is above it, so a stop is never cut short.
graceful_timeout = 30

# No keep-alive: an idle kept-alive connection would count against worker_connections and
# keep a new one waiting. Each response closes its connection, as the sync worker's did.
keepalive = 0

# Recycle each worker after about this many requests, so a slow leak cannot grow forever.
# The jitter spreads the restarts, so that the workers do not all recycle at once.
max_requests = 10000
max_requests_jitter = 1000

# Access log on stdout (journald / the local run), compact: client (X-Forwarded-For behind nginx),
# request line, status, response bytes and time taken. Set GUNICORN_ACCESS_LOG to an empty
# value to turn it off when nginx's access log (which has the same facts) is enough.
accesslog = os.environ.get("GUNICORN_ACCESS_LOG", "-") or None
access_log_format = '%({x-forwarded-for}i)s %(h)s "%(r)s" %(s)s %(B)s %(M)sms'
# Errors and gunicorn's own messages go to stderr (journald / the local run).
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")

# Whose X-Forwarded-* headers gunicorn believes (the scheme, X-Forwarded-Proto): the proxies
# in TRUSTED_PROXIES, the same list ingestion believes X-Real-IP from; none by default, so that
# a client reaching gunicorn directly (the local run) cannot claim HTTPS. Production lists its
# nginx on loopback. A list that does not parse stops gunicorn here, at start. (Django's own
# use of X-Forwarded-Proto is switched by USE_X_FORWARDED_PROTO in the environment.)
forwarded_allow_ips = ",".join(
    str(network) for network in parse_networks(os.environ.get("TRUSTED_PROXIES", "").split(","))
)

# The heartbeat file each worker touches: keep it in RAM so that a slow disk cannot make the
# master think a worker hangs.
if os.path.isdir("/dev/shm"):
    worker_tmp_dir = "/dev/shm"

# Gunicorn 25+ opens a control socket in $XDG_RUNTIME_DIR or ~/.gunicorn for `gunicornc`.
# Nothing here uses it, and a second instance on the same account would contend for it.
control_socket_disable = True

# Names the processes in logs (and in ps, if the optional setproctitle package is installed).
proc_name = "postback"


def child_exit(server: Any, worker: Any) -> None:
    """A worker process ended (recycled, killed): drop its live metric files. Its counts stay
    in the totals that /metrics adds up (PROMETHEUS_MULTIPROC_DIR, prometheus-client's
    multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
