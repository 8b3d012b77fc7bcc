#!/usr/bin/env bash
# System packages `make test` needs beyond the pinned pip packages, installed when missing.
#   chromium  (Debian package chromium)  headless rendering of report.html in the report test
#   ip        (Debian package iproute2)  the loopback-only network namespace of the Ray tests
# PostgreSQL is not installed here: machines of this kind start it before the session
# (127.0.0.1:5432, user postgres, trust). Under CI=true an unreachable server stops the run.
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
    || missing+=(chromium)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)

if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        echo "make test needs the Debian package(s) ${missing[*]}: run" \
            "'sudo apt-get update && sudo apt-get install -y ${missing[*]}', then make test again" >&2
        exit 1
    fi
    echo "installing Debian package(s) ${missing[*]} for the tests (apt-get, once)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    command -v chromium >/dev/null 2>&1 || {
        echo "apt-get installed ${missing[*]} but chromium is still not on PATH" >&2
        exit 1
    }
fi

if [[ ${CI:-} == true ]]; then
    pg=${HEIMDALL_TEST_PG:-postgresql://postgres@127.0.0.1:5432}
    hostport=${pg##*@}
    host=${hostport%%:*}
    port=${hostport##*:}
    port=${port%%/*}
    if ! timeout 5 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null; then
        echo "CI=true: nothing answers at PostgreSQL $host:$port (HEIMDALL_TEST_PG); start it" \
            "('pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start')" >&2
        exit 1
    fi
fi
