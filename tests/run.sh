#!/usr/bin/env bash
# The test command: bash tests/run.sh [PYTEST OPTIONS...]
#
# Idempotent; on a fresh Debian 12 machine (as root) it installs what is missing, starts
# dockerd when nothing answers, builds the local base image, prepares .venv, then runs
# pytest in two stages: tests/unit (no Docker), then tests/e2e. Extra arguments are
# passed to pytest in both stages (so give options such as -k, -x, -v, not paths).
# Stops at the first failing stage; prints the time each stage took.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO_ROOT="$PWD"
TEST_LABEL="ssh-proxy-test=1"
DOCKERD_LOG=/var/log/ssh-proxy-dockerd.log
STAMP="$REPO_ROOT/.venv/.ssh-proxy-requirements.sha256"
PACKAGES=(docker.io openssh-server openssh-client debootstrap rsync sshfs xvfb xauth
          x11-utils bsdextrautils iproute2 curl python3-venv kubectl socat docker-compose)

RUN_STARTED=$SECONDS
step_started=$SECONDS
say() { printf '==> %s\n' "$*"; }
die() { printf 'tests/run.sh: %s\n' "$*" >&2; exit 1; }
step_done() { say "$1 done in $((SECONDS - step_started)) s"; step_started=$SECONDS; }

# -- 1. system packages -------------------------------------------------------------
missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing packages (${missing[*]}) and not root: install them or run as root"
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/tmp/ssh-proxy-apt.log 2>&1 || {
        tail -40 /tmp/ssh-proxy-apt.log >&2
        die "apt-get install ${missing[*]} failed (full log: /tmp/ssh-proxy-apt.log)"
    }
    step_done "package install"
fi

# -- 2. dockerd -----------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "docker does not answer and starting dockerd needs root"
    say "starting dockerd (log: $DOCKERD_LOG)"
    # Its own session, every descriptor redirected: it outlives this script without
    # holding the caller's terminal or pipes.
    setsid nohup dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
    dockerd_pid=$!
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        if ! kill -0 "$dockerd_pid" 2>/dev/null; then
            tail -30 "$DOCKERD_LOG" >&2
            die "dockerd exited at start (log above, full log: $DOCKERD_LOG)"
        fi
        sleep 1
    done
    if ! docker info >/dev/null 2>&1; then
        tail -30 "$DOCKERD_LOG" >&2
        die "dockerd did not answer within 60 s (log above, full log: $DOCKERD_LOG)"
    fi
    step_done "dockerd start"
fi

# -- 3. base image ----------------------------------------------------------------------
bash tests/bootstrap-base-image.sh
step_done "base image"

# -- 4. virtualenv ------------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    python3 -m venv .venv
fi
# The locks (requirements*.txt, hashed) and their inputs (requirements*.in): any change
# re-installs. --require-hashes: every package, transitive ones too, exactly as locked.
req_hash="$(cat requirements*.txt requirements*.in 2>/dev/null | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$req_hash" ]; then
    say "installing requirements-dev.txt (the lock) into .venv"
    .venv/bin/python -m pip install -q --require-hashes -r requirements-dev.txt
    echo "$req_hash" >"$STAMP"
    step_done "pip install"
fi

# -- 5. leftovers -----------------------------------------------------------------------
cleanup() {
    local ids
    ids="$(docker ps -aq --filter "label=$TEST_LABEL" 2>/dev/null || true)"
    # shellcheck disable=SC2086 # one id per word
    [ -z "$ids" ] || docker rm -f -v $ids >/dev/null 2>&1 || true
    ids="$(docker network ls -q --filter "label=$TEST_LABEL" 2>/dev/null || true)"
    # shellcheck disable=SC2086
    [ -z "$ids" ] || docker network rm $ids >/dev/null 2>&1 || true
}
cleanup
trap cleanup EXIT
say "setup took $((SECONDS - RUN_STARTED)) s"

# -- 6. tests ---------------------------------------------------------------------------
# Exit code 5 (no tests collected) is a failure only when neither stage collected any.
run_stage() {  # run_stage NAME DIR [ARGS...]; sets stage_rc
    local name="$1" dir="$2" started=$SECONDS
    shift 2
    say "stage $name: pytest $dir $*"
    set +e
    .venv/bin/python -m pytest "$dir" "$@"
    stage_rc=$?
    set -e
    say "stage $name: exit $stage_rc after $((SECONDS - started)) s"
}

unit_rc=5
if [ -d tests/unit ]; then
    run_stage unit tests/unit "$@"
    unit_rc=$stage_rc
else
    say "stage unit: no tests/unit directory"
fi
if [ "$unit_rc" != 0 ] && [ "$unit_rc" != 5 ]; then
    die "unit stage failed (exit $unit_rc); e2e not run"
fi

e2e_rc=5
if [ -d tests/e2e ]; then
    run_stage e2e tests/e2e "$@"
    e2e_rc=$stage_rc
else
    say "stage e2e: no tests/e2e directory"
fi
if [ "$e2e_rc" != 0 ] && [ "$e2e_rc" != 5 ]; then
    die "e2e stage failed (exit $e2e_rc)"
fi
if [ "$unit_rc" = 5 ] && [ "$e2e_rc" = 5 ]; then
    die "no tests collected in tests/unit nor tests/e2e"
fi
say "all stages passed in $((SECONDS - RUN_STARTED)) s"
