# shellcheck shell=bash
# Shell helpers shared by deploy/run-local.sh and deploy/test.sh. Sourced, not run; the
# caller has cd'ed to the repository root and set -euo pipefail.

say() { printf '==> %s\n' "$*"; }

die() {
    printf '%s: %s\n' "${0##*/}" "$*" >&2
    exit 1
}

# Install Debian packages when root; otherwise say what to run and stop.
apt_install() {
    if [[ $EUID -eq 0 ]]; then
        say "Installing $*"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        die "this needs the Debian package(s) $*. Install them with
    sudo apt-get install -y $*
and run $0 again."
    fi
}

# ensure_venv REQUIREMENTS_FILE: .venv exists and has that file's packages installed.
# Installs again only when a requirements file changed since the last install of that file.
ensure_venv() {
    local requirements=$1
    local stamp=var/installed-${requirements%.txt}.sha256 wanted
    mkdir -p var
    if [[ ! -x .venv/bin/python ]]; then
        say "Creating the virtualenv .venv"
        # Debian ships venv's pip bootstrap (ensurepip) in a separate package, python3-venv.
        if ! python3 -m venv .venv >/dev/null 2>&1; then
            rm -rf .venv
            apt_install python3-venv
            python3 -m venv .venv
        fi
        rm -f var/installed-*.sha256
    fi
    wanted=$(cat requirements*.txt | sha256sum | cut -d' ' -f1)
    if [[ ! -f $stamp || $(<"$stamp") != "$wanted" ]]; then
        say "Installing the Python packages of $requirements"
        .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements"
        echo "$wanted" >"$stamp"
    fi
}
