#!/usr/bin/env bash
# The `redis` process of deploy/local-processes.py: the project's Redis for a local run.
#
# Runs redis-server with deploy/redis.conf, data in var/redis, and the password from
# var/redis-auth.conf (deploy/run-local.sh writes it). It stays in the foreground, logging to
# stdout, and exits with Redis's status.
#
# Why a wrapper rather than a bare redis-server line: a worker's warm shutdown finishes the job
# in hand and then records the result and its own exit in Redis; if Redis had already gone,
# the job would stay "started" and the worker registered. deploy/local-processes.py stops
# Redis last, after web and workers have exited; run by hand, this script still waits, on
# SIGTERM or SIGINT, until every other client has disconnected (4 s at most) before stopping
# Redis, which runs in a session of its own so that a terminal's Ctrl-C reaches only this.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
root=$PWD
port=${REDIS_PORT:-6380} # var/local.env; deploy/redis.conf's own port is production's
auth_file=${POSTBACK_VAR_DIR:-$root/var}/redis-auth.conf
data_dir=${POSTBACK_VAR_DIR:-$root/var}/redis

if [[ ! -r $auth_file ]]; then
    echo "local-redis: $auth_file is missing: run deploy/run-local.sh" >&2
    exit 1
fi
mkdir -p "$data_dir"

# Redis warns "Memory overcommit must be enabled!" at every start where the kernel's
# vm.overcommit_memory is 0: a background save (fork) may then fail under memory pressure.
# Production sets it (deploy/provision.sh); a local run can live with it, and says so.
if [[ $(cat /proc/sys/vm/overcommit_memory 2>/dev/null) == 0 ]]; then
    echo "local-redis: Redis will warn about memory overcommit; harmless for a local run" \
        "(to silence it: sudo sysctl vm.overcommit_memory=1). Production sets it." >&2
fi

# --include before --dir: Redis chdir()s into `dir` while reading its configuration. The port
# comes last: it overrides deploy/redis.conf's.
setsid redis-server deploy/redis.conf --include "$auth_file" --dir "$data_dir" --port "$port" &
redis_pid=$!

password=$(sed -n 's/^requirepass[[:space:]]\{1,\}//p' "$auth_file")

# shellcheck disable=SC2317 # reached from the trap below
connected_clients() {
    REDISCLI_AUTH=$password redis-cli -p "$port" INFO clients 2>/dev/null |
        sed -n 's/^connected_clients:\([0-9]*\).*/\1/p'
}

# shellcheck disable=SC2317 # reached from the trap below
stop() {
    trap '' TERM INT # a second signal must not interrupt the orderly stop
    local i clients
    for ((i = 0; i < 20; i++)); do # 20 x 0.2 s = 4 s
        clients=$(connected_clients)
        # 1 is this redis-cli itself; empty means Redis no longer answers.
        if [[ -z $clients || $clients -le 1 ]]; then
            break
        fi
        sleep 0.2
    done
    kill -TERM "$redis_pid" 2>/dev/null || true # Redis: fsync the AOF, save, exit
    local status=0
    wait "$redis_pid" || status=$?
    exit "$status"
}
trap stop TERM INT

status=0
wait "$redis_pid" || status=$? # returns when Redis exits on its own (e.g. port taken)
exit "$status"
