#!/usr/bin/env bash
# Provision a Debian 12 server for the postback service, from a checkout of this repository:
#
#   sudo deploy/provision.sh [SERVER_NAME]       e.g. sudo deploy/provision.sh postbacks.example.com
#
# Installs the stack (PostgreSQL, Redis, nginx, Python), the code in /opt/postback with its
# virtualenv, the settings in /etc/postback, the systemd units and the nginx site; creates
# the database; migrates; and starts everything, enabled at boot. Run it again to deploy a
# new version: it only creates what is missing, keeps existing secrets and your edits to
# /etc/postback/postback.env, and restarts web and workers on the new code.
#
# Environment knobs: POSTBACK_WORKERS (delivery worker processes; default 2 per CPU core).
#
# Layout:
#   /opt/postback                 code and .venv (root-owned: the service cannot change it)
#   /etc/postback/postback.env    settings and secrets of web and workers (0640 root:postback)
#   /etc/postback/redis-auth.conf Redis's password (0640 root:redis)
#   /var/lib/postback/redis       Redis's AOF and snapshot (redis:redis)
#   /var/lib/postback/static      collected static files, served by nginx
#   PostgreSQL database `postback`, role `postback`, peer authentication over the socket
set -euo pipefail

app=/opt/postback
etc=/etc/postback
state=/var/lib/postback
units=(postback.target postback-redis.service postback-web.service postback-worker@.service
    postback-prune.service postback-prune.timer)

say() { printf '\n==> %s\n' "$*"; }
die() {
    printf 'provision: %s\n' "$*" >&2
    exit 1
}

install_packages() {
    say "Installing packages"
    apt-get update -qq
    # redis-server also brings Debian's own Redis service on port 6379; it is left as it is.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        python3 python3-venv redis-server redis-tools nginx postgresql rsync ca-certificates
}

tune_kernel() {
    # Redis forks to write its AOF rewrite and snapshot; without overcommit the fork can
    # fail under memory pressure (Redis warns about it at start).
    local conf=/etc/sysctl.d/60-postback-redis.conf
    if [[ ! -f $conf ]]; then
        say "Setting vm.overcommit_memory=1 for Redis ($conf)"
        printf '# For Redis (postback-redis.service): fork for AOF rewrite and snapshots.\nvm.overcommit_memory = 1\n' >"$conf"
        sysctl -q -p "$conf" || echo "provision: could not apply $conf now (applies at boot)" >&2
    fi
}

create_user_and_dirs() {
    if ! id -u postback >/dev/null 2>&1; then
        say "Creating the system user postback"
        useradd --system --user-group --home-dir "$state" --no-create-home \
            --shell /usr/sbin/nologin postback
    fi
    # /etc/postback stays traversable so that the redis user can reach its own file there.
    install -d -o root -g root -m 0755 "$etc" "$state"
    install -d -o postback -g postback -m 0755 "$state/static"
    install -d -o redis -g redis -m 0750 "$state/redis"
}

install_code() {
    local src=$1
    if [[ $src -ef $app ]]; then
        say "Using the code in place ($app)"
        return
    fi
    say "Copying the code from $src to $app"
    # Root-owned and world-readable; the checkout's git, virtualenv, local state and caches
    # stay behind.
    rsync -a --delete --chown=root:root --chmod=u+w,go=rX \
        --exclude=/.git/ --exclude=/.venv/ --exclude=/var/ \
        --exclude=/.mypy_cache/ --exclude=/.pytest_cache/ --exclude=/.ruff_cache/ \
        --exclude=__pycache__/ --exclude='*.pyc' \
        "$src/" "$app/"
}

install_virtualenv() {
    local stamp=$app/.venv/requirements.sha256 wanted
    if [[ ! -x $app/.venv/bin/python ]]; then
        say "Creating the virtualenv $app/.venv"
        python3 -m venv "$app/.venv"
    fi
    wanted=$(sha256sum "$app/requirements.txt" | cut -d' ' -f1)
    if [[ ! -f $stamp || $(<"$stamp") != "$wanted" ]]; then
        say "Installing the Python packages of requirements.txt"
        "$app/.venv/bin/python" -m pip install --quiet --disable-pip-version-check \
            -r "$app/requirements.txt"
        echo "$wanted" >"$stamp"
    fi
}

# The server's addresses as Django ALLOWED_HOSTS entries (IPv6 in brackets).
default_allowed_hosts() {
    local hosts=() addr
    hosts+=("$(hostname -f 2>/dev/null || hostname)")
    for addr in $(hostname -I 2>/dev/null || true); do
        [[ $addr == *:* ]] && addr="[$addr]"
        hosts+=("$addr")
    done
    hosts+=(localhost 127.0.0.1 "[::1]")
    local IFS=,
    echo "${hosts[*]}"
}

# set_env KEY VALUE: replace KEY's line in postback.env, or append it.
set_env() {
    local file=$etc/postback.env
    if grep -q "^$1=" "$file"; then
        sed -i "s|^$1=.*|$1=$2|" "$file"
    else
        echo "$1=$2" >>"$file"
    fi
}

write_settings() {
    local server_name=$1 file=$etc/postback.env
    if [[ ! -f $file ]]; then
        say "Generating $file with new secrets"
        local secret_key redis_password allowed_hosts
        secret_key=$(python3 -c 'import secrets; print(secrets.token_urlsafe(50))')
        redis_password=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
        metrics_token=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
        allowed_hosts=$(default_allowed_hosts)
        (
            umask 077
            cat >"$file.tmp" <<EOF
# Settings of the postback service's web and workers: systemd reads this file
# (EnvironmentFile=), so does deploy/manage.sh. Made by deploy/provision.sh on $(date -u +%F);
# re-runs keep it (they only rewrite ALLOWED_HOSTS when given a server name). After an edit:
#   systemctl restart postback-web 'postback-worker@*'
# Names and defaults: postbackproject/settings.py. No inline comments: systemd reads them
# as part of the value.
SECRET_KEY=$secret_key
# Redis's copy of this password is /etc/postback/redis-auth.conf (rewritten from here by
# provision.sh; restart postback-redis after changing it).
REDIS_PASSWORD=$redis_password
REDIS_URL=redis://:$redis_password@127.0.0.1:6380/0
# PostgreSQL over its Unix socket, as the OS user postback (peer authentication).
DATABASE_URL=postgres://postback@/postback
DEBUG=false
ALLOWED_HOSTS=$allowed_hosts
CSRF_TRUSTED_ORIGINS=
# nginx sets X-Forwarded-Proto, and gunicorn only listens on loopback, behind it.
USE_X_FORWARDED_PROTO=true
# HTTPS is off: no certificate exists yet. Once nginx serves HTTPS (docs/operations.md,
# "Turning HTTPS on"), set the next three to true and SECURE_HSTS_SECONDS=31536000.
SECURE_SSL_REDIRECT=false
SESSION_COOKIE_SECURE=false
CSRF_COOKIE_SECURE=false
SECURE_HSTS_SECONDS=0
# collectstatic writes here; nginx serves it.
STATIC_ROOT=$state/static
# Private or loopback networks delivery may reach anyway (comma-separated CIDRs).
DELIVERY_ALLOW_NETWORKS=
LOG_LEVEL=INFO
# Every log line one JSON object, for journald and whatever reads it ("text" for people).
LOG_FORMAT=json
# Prometheus scrapes /metrics with "Authorization: Bearer <this>" (docs/operations.md).
METRICS_TOKEN=$metrics_token
# Profiles of one request (X-Profile: METRICS_TOKEN) or one drain job (manage.py profilejob).
PROFILE_DIR=$state/profiles
# Also recognised, shown with their defaults:
# DELIVERY_CONCURRENCY=1024 (requests in flight per worker; LimitNOFILE in the unit covers it)
# INGEST_MAX_BODY_BYTES=1048576 (keep nginx's client_max_body_size in step)
# INGEST_MAX_DATA_OBJECTS=10000
# INGEST_MAX_PLACEHOLDERS=64
# INGEST_MAX_RENDERED_BYTES=16777216 (URLs and bodies of one request's postbacks, filled in)
# INGEST_MAX_QUEUED_JOBS=100000
# TRUSTED_PROXIES=127.0.0.1/32 (set by postback-web.service: nginx on loopback names the client)
# ATTEMPT_RETENTION_DAYS=30 (postback-prune.timer deletes older attempts daily)
# MINUTE_ROLLUP_RETENTION_DAYS=35
# ROLLUP_RETENTION_DAYS=400
# TIME_ZONE=UTC (the dashboard's and admin's clock)
# WEB_CONCURRENCY=(2 x CPU cores + 1 gunicorn workers)
EOF
        )
        mv "$file.tmp" "$file"
    fi
    if [[ -n $server_name ]]; then
        set_env ALLOWED_HOSTS "$server_name,localhost,127.0.0.1,[::1]"
    fi
    chown root:postback "$file"
    chmod 0640 "$file"

    # Redis's password, taken from the settings so the two cannot drift apart.
    local password
    password=$(sed -n 's/^REDIS_PASSWORD=//p' "$file")
    [[ $password =~ ^[A-Za-z0-9._~-]+$ ]] ||
        die "REDIS_PASSWORD in $file must be set, with letters, digits and ._~- only"
    (
        umask 077
        printf '# Made by deploy/provision.sh from REDIS_PASSWORD in postback.env.\nrequirepass %s\n' \
            "$password" >"$etc/redis-auth.conf.tmp"
    )
    chown root:redis "$etc/redis-auth.conf.tmp"
    chmod 0640 "$etc/redis-auth.conf.tmp"
    mv "$etc/redis-auth.conf.tmp" "$etc/redis-auth.conf"
}

# psql as the postgres superuser; from / since postgres may not enter the current directory.
as_postgres() { (cd / && runuser -u postgres -- "$@"); }

create_database() {
    say "Preparing PostgreSQL (role and database postback)"
    systemctl enable --now postgresql
    local i
    for ((i = 0; i < 30; i++)); do
        as_postgres pg_isready -q && break
        sleep 1
    done
    as_postgres pg_isready -q || die "PostgreSQL does not accept connections"
    if [[ -z $(as_postgres psql -XtAc "SELECT 1 FROM pg_roles WHERE rolname = 'postback'") ]]; then
        as_postgres createuser postback
    fi
    if [[ -z $(as_postgres psql -XtAc "SELECT 1 FROM pg_database WHERE datname = 'postback'") ]]; then
        as_postgres createdb --owner=postback postback
    fi
}

install_units() {
    say "Installing the systemd units"
    local unit
    for unit in "${units[@]}"; do
        install -m 0644 "$app/deploy/systemd/$unit" "/etc/systemd/system/$unit"
    done
    systemctl daemon-reload
}

start_redis() {
    # Restart our Redis only when its settings changed (the workers follow it: Requires=).
    local sums=$state/.redis-config.sha256 wanted
    wanted=$(cat "$app/deploy/redis.conf" "$app/deploy/systemd/postback-redis.service" \
        "$etc/redis-auth.conf" | sha256sum | cut -d' ' -f1)
    systemctl enable postback-redis.service
    if systemctl is-active -q postback-redis.service && [[ -f $sums && $(<"$sums") != "$wanted" ]]; then
        say "Restarting postback-redis (its settings changed)"
        systemctl restart postback-redis.service
    else
        systemctl start postback-redis.service
    fi
    echo "$wanted" >"$sums"
}

migrate_and_collectstatic() {
    say "Migrating the database and collecting static files"
    # manage.sh loads the settings and runs as the user postback.
    POSTBACK_ENV_FILE=$etc/postback.env "$app/deploy/manage.sh" migrate --noinput
    POSTBACK_ENV_FILE=$etc/postback.env "$app/deploy/manage.sh" collectstatic --noinput --verbosity 0
}

start_service() {
    local workers=$1 i link n
    say "Starting web and $workers delivery workers"
    local wanted=(postback.target postback-web.service)
    for ((i = 1; i <= workers; i++)); do
        wanted+=("postback-worker@$i.service")
    done
    # Workers enabled by an earlier run with a larger POSTBACK_WORKERS.
    for link in /etc/systemd/system/postback.target.wants/postback-worker@*.service; do
        [[ -e $link || -L $link ]] || continue
        n=${link##*@}
        n=${n%.service}
        if ((n > workers)); then
            systemctl disable --now "postback-worker@$n.service"
        fi
    done
    systemctl enable "${wanted[@]}"
    # New code: web reloads gracefully, workers finish their job in hand and restart.
    systemctl reload-or-restart postback-web.service
    systemctl restart "${wanted[@]:2}"
    systemctl start postback.target
    # Daily pruning of delivery history past its retention (docs/operations.md).
    systemctl enable --now postback-prune.timer
}

install_nginx_site() {
    local server_name=$1
    say "Installing the nginx site"
    sed "s/server_name _;/server_name ${server_name:-_};/" "$app/deploy/nginx/postback.conf" \
        >/etc/nginx/sites-available/postback.conf
    ln -sfn ../sites-available/postback.conf /etc/nginx/sites-enabled/postback.conf
    # Debian's welcome site is also the default server on port 80: the two cannot coexist.
    if [[ -L /etc/nginx/sites-enabled/default ]]; then
        echo "provision: disabling Debian's default nginx site (sites-enabled/default)"
        rm /etc/nginx/sites-enabled/default
    fi
    nginx -t -q
    systemctl enable nginx
    systemctl reload-or-restart nginx
}

main() {
    local server_name=${1:-}
    local workers=${POSTBACK_WORKERS:-$((2 * $(nproc)))}
    local src
    src=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)

    [[ $EUID -eq 0 ]] || die "run as root (sudo $0 $*)"
    [[ -z $server_name || $server_name =~ ^[A-Za-z0-9.-]+$ ]] ||
        die "'$server_name' is not a host name"
    [[ $workers =~ ^[1-9][0-9]*$ ]] || die "POSTBACK_WORKERS must be a positive number"
    command -v apt-get >/dev/null || die "this script is for Debian (apt-get not found)"
    umask 022 # code, venv and static files must be readable by postback and nginx
    [[ -d /run/systemd/system ]] || die "systemd is not running: use deploy/run-local.sh instead"

    install_packages
    tune_kernel
    create_user_and_dirs
    install_code "$src"
    install_virtualenv
    write_settings "$server_name"
    create_database
    install_units
    start_redis
    migrate_and_collectstatic
    start_service "$workers"
    install_nginx_site "$server_name"

    local host=${server_name:-$(hostname -f 2>/dev/null || hostname)}
    cat <<EOF

Done. The service runs and starts at boot:
  systemctl status postback.target 'postback-*'
  Ingest:  curl -i --data-binary @postback.json http://$host/ingest.php
  Admin:   http://$host/admin/   (first user: $app/deploy/manage.sh createsuperuser)
  Health, logs and what to do when things break: $app/docs/operations.md
HTTPS is off until you install a certificate: see "Turning HTTPS on" there.
EOF
}

# Sourcing the file (to test a function) defines the functions without running anything.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
