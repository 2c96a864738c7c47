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

# shellcheck source=deploy/lib.sh
. deploy/lib.sh

command -v redis-server >/dev/null || apt_install redis-server
# promtool checks and unit-tests the alert rules (deploy/prometheus).
command -v promtool >/dev/null || apt_install prometheus
# The clock-skew tests run a worker whose wall clock is off, with Debian's libfaketime.
command -v faketime >/dev/null || apt_install faketime
# The browser test drives Debian's Chromium through Playwright (no browser download).
[[ -x /usr/bin/chromium ]] || apt_install chromium
# tests/test_machines.py builds hosts from network namespaces (as root, on PostgreSQL).
command -v ip >/dev/null || apt_install iproute2
ensure_venv requirements-dev.txt

say "ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
say "mypy"
.venv/bin/mypy .
say "pytest (database: ${DATABASE_URL:-SQLite})"
.venv/bin/python -m pytest "$@"
