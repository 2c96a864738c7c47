#!/usr/bin/env bash
# Set up and run the internal benchmark (manage.py benchmark; docs/benchmark.md), e.g.
#
#   deploy/benchmark.sh all --json var/benchmark.json --plot var/benchmark.png
#   deploy/benchmark.sh loop --duration 30
#   deploy/benchmark.sh wild --json var/wild.json --plot var/wild.png
#
# The tool starts its own Redis, gunicorn, RQ workers and receivers on free loopback ports
# and stops them at the end: the local run (deploy/run-local.sh) need not be running, and is
# left alone if it is. To drive a running service instead, use deploy/manage.sh, which loads
# that service's settings: deploy/manage.sh benchmark loop --url http://127.0.0.1:8000
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

# shellcheck source=deploy/lib.sh
. deploy/lib.sh

command -v redis-server >/dev/null || apt_install redis-server
# `wild` starts the workers in a mount namespace of their own, with the run's resolv.conf over
# /etc/resolv.conf (as root; without root it runs every host by address and says so).
command -v unshare >/dev/null || apt_install util-linux
# The PHP baseline (--php-baseline): the brief's stack, Debian's nginx + php-fpm + phpredis.
if [[ " $* " == *" --php-baseline"* ]]; then
    { command -v nginx && compgen -G "/usr/sbin/php-fpm*" && compgen -G "/etc/php/*/mods-available/redis.ini"; } \
        >/dev/null || apt_install nginx php-fpm php-redis
fi
ensure_venv requirements.txt   # trustme and dnslib for `wild` come with it

# The tool's own process loads the settings, which want a SECRET_KEY; it signs nothing. The
# services it starts get random keys of their own.
SECRET_KEY=${SECRET_KEY:-$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(50))')}
export SECRET_KEY
exec .venv/bin/python manage.py benchmark "$@"
