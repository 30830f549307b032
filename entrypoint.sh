#!/bin/sh
# The watcher is PID 1: it runs sshd as its child, forwards SIGTERM to it and exits 0.
# Any other command (e.g. `docker run IMAGE watcher check-config`) runs instead.
set -e
if [ "$#" -gt 0 ]; then
    exec "$@"
fi
exec /opt/ssh-proxy/venv/bin/watcher run
