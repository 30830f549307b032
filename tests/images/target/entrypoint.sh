#!/bin/bash
# Entrypoint of the test target image (tests/images/target).
#   TARGET_PUBKEY        public key authorised for root, also written to ~/.ssh/id_ed25519.pub
#                        (the file the proxy reads by `docker exec` by default)
#   SERVE_PUBLICKEY      1 = serve GET /publickey (default 0)
#   PUBLICKEY_PORT       port of that service (default 8080)
#   PUBLICKEY_BODY_FILE  file served instead of ~/.ssh/id_ed25519.pub (hostile bodies)
#   PUBLICKEY_DELAY      seconds to wait before answering (slow API), default 0
#   PUBLICKEY_STATUS     HTTP status of /publickey answers, default 200
# Also serves /srv/www on 127.0.0.1:8000 (hello.txt) for -L tunnel tests.
set -euo pipefail

ssh-keygen -A >/dev/null
mkdir -p /run/sshd
install -d -m 700 /root/.ssh
if [ -n "${TARGET_PUBKEY:-}" ]; then
    printf '%s\n' "$TARGET_PUBKEY" >/root/.ssh/authorized_keys
    printf '%s\n' "$TARGET_PUBKEY" >/root/.ssh/id_ed25519.pub
    chmod 600 /root/.ssh/authorized_keys
    chmod 644 /root/.ssh/id_ed25519.pub
fi
# An existing (empty) ~/.Xauthority: no "xauth: file does not exist" on the first -X login.
install -m 600 /dev/null /root/.Xauthority

wait_port() {  # wait_port PORT: until something listens on 127.0.0.1:PORT (max 10 s)
    local i
    for i in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "target-entrypoint: nothing listens on port $1" >&2
    return 1
}

mkdir -p /srv/www
echo "hello from $(hostname)" >/srv/www/hello.txt
python3 -m http.server --bind 127.0.0.1 8000 --directory /srv/www >/var/log/hello-http.log 2>&1 &

if [ "${SERVE_PUBLICKEY:-0}" = 1 ]; then
    python3 /usr/local/lib/target/publickey_server.py &
    wait_port "${PUBLICKEY_PORT:-8080}"
fi
wait_port 8000

# sshd last: once it answers, every service above is ready.
exec /usr/sbin/sshd -D -e
