#!/usr/bin/env bash
# Run manage.py with the service's settings loaded, e.g.
#   deploy/manage.sh createsuperuser
#   deploy/manage.sh rqstats
#
# Settings come from POSTBACK_ENV_FILE if set, else var/local.env of this checkout (made by
# deploy/run-local.sh), else /etc/postback/postback.env (made by deploy/provision.sh).
# With the production file, it runs as the service user `postback` (PostgreSQL lets that
# user in by peer authentication), switching to it when started as root.
set -euo pipefail

root=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
env_file=${POSTBACK_ENV_FILE:-}
if [[ -z $env_file ]]; then
    if [[ -f $root/var/local.env ]]; then
        env_file=$root/var/local.env
    elif [[ -f /etc/postback/postback.env ]]; then
        env_file=/etc/postback/postback.env
    else
        echo "manage.sh: no settings found: run deploy/run-local.sh (or deploy/provision.sh)" >&2
        exit 1
    fi
fi

if [[ $env_file == /etc/postback/* && $(id -un) != postback ]]; then
    if [[ $EUID -ne 0 ]]; then
        echo "manage.sh: run as root or as postback (e.g. sudo $0 $*)" >&2
        exit 1
    fi
    exec runuser -u postback -- env POSTBACK_ENV_FILE="$env_file" "$root/deploy/manage.sh" "$@"
fi

cd "$root"
set -a
# shellcheck source=/dev/null
. "$env_file"
set +a
# Commands count their metrics where the services do: the units set this folder
# (postback-web.service); elsewhere the default, var/metrics, is the local run's.
if [[ $env_file == /etc/postback/* ]]; then
    export PROMETHEUS_MULTIPROC_DIR=${PROMETHEUS_MULTIPROC_DIR:-/run/postback/metrics}
fi
exec "$root/.venv/bin/python" manage.py "$@"
