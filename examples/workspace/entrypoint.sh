#!/bin/bash
# WORKSPACE_PUBKEY: your public key (one line). Authorised for root here, and served as
# GET :8080/publickey, which is how the proxy learns to let it through to this workspace.
set -euo pipefail

if [ -z "${WORKSPACE_PUBKEY:-}" ]; then
    echo "workspace: set WORKSPACE_PUBKEY to your public key (e.g. \"\$(cat ~/.ssh/id_ed25519.pub)\")" >&2
    exit 1
fi
[ -f /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
mkdir -p /run/sshd
install -d -m 700 /root/.ssh
printf '%s\n' "$WORKSPACE_PUBKEY" >/root/.ssh/authorized_keys
chmod 600 /root/.ssh/authorized_keys

python3 /usr/local/lib/workspace/publickey_server.py &
exec /usr/sbin/sshd -D -e
