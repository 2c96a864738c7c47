#!/usr/bin/env bash
# Set up and run the whole test suite: lint, types, then pytest against a real redis-server
# (the suite starts its own on a free port) and the database in DATABASE_URL (default:
# SQLite). Run from anywhere:
#
#   deploy/test.sh                                                  # SQLite
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/test deploy/test.sh   # PostgreSQL
#
# Extra arguments go to pytest (e.g. deploy/test.sh -k retry -x).
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

say() { printf '==> %s\n' "$*"; }

apt_install() {
    if [[ $EUID -ne 0 ]]; then
        echo "test.sh: needs the Debian package(s) $*: sudo apt-get install -y $*" >&2
        exit 1
    fi
    say "Installing $*"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

command -v redis-server >/dev/null || apt_install redis-server

if [[ ! -x .venv/bin/python ]]; then
    say "Creating the virtualenv .venv"
    if ! python3 -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv
        apt_install python3-venv
        python3 -m venv .venv
    fi
fi
mkdir -p var
stamp=var/requirements-dev.sha256
wanted=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [[ ! -f $stamp || $(<"$stamp") != "$wanted" ]]; then
    say "Installing requirements-dev.txt"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
    echo "$wanted" >"$stamp"
fi

say "ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
say "mypy"
.venv/bin/mypy .
say "pytest (database: ${DATABASE_URL:-SQLite})"
.venv/bin/python -m pytest "$@"
