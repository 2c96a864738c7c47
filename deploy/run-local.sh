#!/usr/bin/env bash
# Set up and run the whole postback service on this machine (Debian or Ubuntu):
# Redis on port 6380 (REDIS_PORT), gunicorn on 127.0.0.1:8000 and two RQ workers, in the foreground
# under deploy/local-processes.py (Ctrl-C stops web, then the workers, then Redis).
#
#   deploy/run-local.sh          (from anywhere; Ctrl-C stops everything)
#
# Safe to run again: each step only does what is missing. State lives in var/ (git-ignored):
#   var/local.env         settings and generated secrets (mode 0600), read by every process
#   var/redis-auth.conf   Redis's password, included by deploy/local-redis.sh
#   var/redis/            Redis's append-only file and snapshot
#   var/db.sqlite3        the database;  var/static/  collected static files
# Production is different: deploy/provision.sh and systemd (see docs/operations.md).
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
root=$PWD

# shellcheck source=deploy/lib.sh
. deploy/lib.sh

# --- 1. System packages ---------------------------------------------------------------------

# Only the binary is needed: we run our own redis-server (deploy/redis.conf, port 6380). A
# stock Redis service the package may start on 6379 is left alone.
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    apt_install redis-server
fi
command -v python3 >/dev/null || apt_install python3
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    die "Python 3.10 or newer is needed (Django 5.2); python3 is $(python3 -V 2>&1)."

# --- 2. Python environment ------------------------------------------------------------------

mkdir -p var/redis
ensure_venv requirements.txt

# --- 3. Settings and secrets (generated once) -----------------------------------------------

umask 077 # what follows holds secrets: readable by this user only
if [[ ! -f var/local.env ]]; then
    say "Generating var/local.env with new secrets"
    secret_key=$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(50))')
    redis_password=$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(24))')
    metrics_token=$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(24))')
    cat >var/local.env.tmp <<EOF
# Settings of the local run, made by deploy/run-local.sh on $(date -u +%F).
# Secret: keep it out of git (var/ is ignored). Sourced by deploy/run-local.sh (which passes it
# on to every process) and deploy/manage.sh, so \${NAME} refers to a setting above it.
# Names: see postbackproject/settings.py.
SECRET_KEY=$secret_key
# Redis's copy of this password is var/redis-auth.conf, rewritten from here on every start.
REDIS_PASSWORD=$redis_password
# The local Redis's port: the one place to change it.
REDIS_PORT=6380
REDIS_URL=redis://:\${REDIS_PASSWORD}@127.0.0.1:\${REDIS_PORT}/0
DEBUG=false
ALLOWED_HOSTS=localhost,127.0.0.1,[::1]
# Plain HTTP on loopback: no HTTPS redirect, cookies without the Secure flag, no HSTS.
SECURE_SSL_REDIRECT=false
SESSION_COOKIE_SECURE=false
CSRF_COOKIE_SECURE=false
SECURE_HSTS_SECONDS=0
# Delivery refuses private and loopback destinations (SSRF guard). To deliver to receivers
# on this machine (tests, benchmarks), set: DELIVERY_ALLOW_NETWORKS=127.0.0.0/8
DELIVERY_ALLOW_NETWORKS=
# /metrics answers "Authorization: Bearer <this>" (curl -H "Authorization: Bearer \$METRICS_TOKEN").
METRICS_TOKEN=$metrics_token
# Ctrl-C: each worker waits this long for the requests it has in flight before it stops.
DELIVERY_STOP_GRACE_SECONDS=4
# Optional: WEB_CONCURRENCY=4 (gunicorn processes; default 2 x CPU cores + 1),
# GUNICORN_THREADS=8 (threads in each), GUNICORN_BIND=127.0.0.1:8000 (loopback: no nginx in
# front buffers slow clients here). More: README.md, "Configuration".
EOF
    mv var/local.env.tmp var/local.env
fi

set -a
# shellcheck source=/dev/null
. var/local.env
# Files made by earlier versions lack these: the same defaults.
REDIS_PORT=${REDIS_PORT:-6380}
DELIVERY_STOP_GRACE_SECONDS=${DELIVERY_STOP_GRACE_SECONDS:-4}
set +a

[[ ${REDIS_PASSWORD:-} =~ ^[A-Za-z0-9._~-]+$ ]] ||
    die "REDIS_PASSWORD in var/local.env must be set, with letters, digits and ._~- only."
printf 'requirepass %s\n' "$REDIS_PASSWORD" >var/redis-auth.conf.tmp
mv var/redis-auth.conf.tmp var/redis-auth.conf
umask 022

# --- 4. Ports: fail now, clearly, rather than once the processes start ----------------------

port_in_use() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

if port_in_use 127.0.0.1 "$REDIS_PORT"; then
    die "port $REDIS_PORT is already in use: a previous run still going, or another Redis.
    See what holds it:  ss -ltnp 'sport = :$REDIS_PORT'
Stop it (a previous run: Ctrl-C in its terminal), or choose another REDIS_PORT in
var/local.env, then run $0 again."
fi
web_bind=${GUNICORN_BIND:-127.0.0.1:8000}
if [[ $web_bind != unix:* ]]; then
    web_host=${web_bind%:*}
    web_host=${web_host#[}
    web_host=${web_host%]}
    [[ $web_host == 0.0.0.0 || -z $web_host ]] && web_host=127.0.0.1
    [[ $web_host == :: ]] && web_host=::1
    if port_in_use "$web_host" "${web_bind##*:}"; then
        die "$web_bind (the web process's address) is already in use.
    See what holds it:  ss -ltnp 'sport = :${web_bind##*:}'
Stop it, or choose another address with GUNICORN_BIND=host:port in var/local.env."
    fi
fi

# --- 5. Database and static files -----------------------------------------------------------

say "Applying database migrations"
.venv/bin/python manage.py migrate --noinput
say "Collecting static files"
.venv/bin/python manage.py collectstatic --noinput --verbosity 0

# Metrics of every process of this run, added up by /metrics; a new run starts from zero.
export PROMETHEUS_MULTIPROC_DIR=$root/var/metrics
rm -rf "$PROMETHEUS_MULTIPROC_DIR"
mkdir -p "$PROMETHEUS_MULTIPROC_DIR"

# --- 6. Run ---------------------------------------------------------------------------------

web_url=http://${web_bind#unix:}
cat <<EOF

The service is starting: Redis :$REDIS_PORT, web $web_bind, workers 1 and 2.
Ctrl-C stops it all, in order: web, then the workers, Redis last.
  Send a postback:   curl -i --data-binary '{"endpoint":{"method":"GET","url":"https://example.com/?k={key}"},"data":[{"key":"v"}]}' $web_url/ingest.php
  Dashboard:         $web_url/dashboard/
  Admin:             $web_url/admin/
  First admin user:  deploy/manage.sh createsuperuser    (in another terminal)
  Queue statistics:  deploy/manage.sh rqstats
  Troubleshooting:   docs/operations.md

EOF

# Workers keep a descriptor per connection (DELIVERY_CONCURRENCY in flight and idle ones):
# the soft open-file limit up to the hard one (each worker checks it has enough at start).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

export PATH="$root/.venv/bin:$PATH"
# The settings are in the environment already, \${NAME} references expanded.
exec .venv/bin/python deploy/local-processes.py
