FROM debian:bookworm-slim

# Stock Debian OpenSSH; `look` (bsdextrautils) answers sshd's key lookups.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        openssh-server python3 python3-venv bsdextrautils ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 # Host keys are made at first start (into a volume), never baked into the image.
 && rm -f /etc/ssh/ssh_host_* \
 && mkdir -p /run/sshd /etc/ssh/host_keys /etc/ssh/authorized_keys.d /run/ssh-proxy

# The only login: tunnels, never a shell. Debian's useradd leaves the account locked,
# which sshd refuses even for public keys: '*' = no password, but not locked.
COPY sshd/no-shell /usr/local/libexec/ssh-proxy/no-shell
RUN chmod 755 /usr/local/libexec/ssh-proxy/no-shell \
 && useradd --system --home-dir /home/limited-user \
        --shell /usr/local/libexec/ssh-proxy/no-shell limited-user \
 && usermod -p '*' limited-user \
 && install -d -o root -g root -m 755 /home/limited-user

# The lock: every runtime dependency, transitive ones included, pinned with its hashes.
COPY requirements.txt /opt/ssh-proxy/requirements.txt
RUN python3 -m venv /opt/ssh-proxy/venv \
 && /opt/ssh-proxy/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
        --require-hashes -r /opt/ssh-proxy/requirements.txt

COPY pyproject.toml /opt/ssh-proxy/src/pyproject.toml
COPY watcher /opt/ssh-proxy/src/watcher
RUN /opt/ssh-proxy/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps \
        /opt/ssh-proxy/src \
 && ln -s /opt/ssh-proxy/venv/bin/watcher /usr/local/bin/watcher

COPY sshd/sshd_config.template /opt/ssh-proxy/sshd/sshd_config.template
COPY sshd/authorized-keys-command /usr/local/libexec/ssh-proxy/authorized-keys-command
COPY entrypoint.sh /entrypoint.sh
RUN chmod 755 /usr/local/libexec/ssh-proxy/authorized-keys-command /entrypoint.sh

VOLUME ["/etc/ssh/host_keys"]
EXPOSE 22
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["/opt/ssh-proxy/venv/bin/watcher", "health"]
ENTRYPOINT ["/entrypoint.sh"]
