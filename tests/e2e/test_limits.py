"""sshd's per-source limits with the real image: one address that floods the proxy with
unauthenticated connections cannot keep another address from logging in."""

from __future__ import annotations

import json
import secrets

from helpers import SESSION_LABEL, TEST_LABEL, SshClient, docker, remove_container, unique_name, wait_for_login, \
    wait_until

FLOOD_CONNECTIONS = 400  # more than PerSourceMaxStartups (256), fewer than MaxStartups' start (512)
FLOOD_LIMIT = 180  # seconds the flood runs at most, whatever happens to the test

# Keeps FLOOD_CONNECTIONS connections to HOST:22 open, each sending an SSH banner and then
# nothing (a slot held until LoginGraceTime), reopening any that closes (at most 16 per
# 0.1 s), until /tmp/release exists or LIMIT seconds pass. Prints a JSON status line every
# half second: open = connections that got sshd's banner and are still open; refused = connections
# closed without a banner ("Exceeded MaxStartups").
_FLOOD = r"""
import json, os, selectors, socket, sys, time
host, want, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
sel = selectors.DefaultSelector()
got = {}
stats = {"opened": 0, "refused": 0, "errors": 0, "open": 0, "max_open": 0}
end = time.monotonic() + limit
next_report = next_refill = 0.0
while time.monotonic() < end and not os.path.exists("/tmp/release") and stats["opened"] < 50000:
    # The first round opens them all; later rounds refill at most 16 every 0.1 s (refused
    # connections come back at once, and the flood must stay bounded in count).
    budget = want if stats["opened"] == 0 else (16 if time.monotonic() >= next_refill else 0)
    if budget and stats["opened"]:
        next_refill = time.monotonic() + 0.1
    while len(got) < want and budget > 0 and time.monotonic() < end:
        budget -= 1
        sock = socket.socket()
        sock.settimeout(10)
        try:
            sock.connect((host, 22))
            sock.sendall(b"SSH-2.0-flood\r\n")
        except OSError:
            stats["errors"] += 1
            sock.close()
            break
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
        got[sock] = b""
        stats["opened"] += 1
    for key, _ in sel.select(0.1):
        sock = key.fileobj
        try:
            data = sock.recv(4096)
        except OSError:
            data = b""
        if data:
            got[sock] = (got[sock] + data)[:8]
            continue
        if not got[sock].startswith(b"SSH-"):
            stats["refused"] += 1
        sel.unregister(sock)
        sock.close()
        del got[sock]
    stats["open"] = sum(1 for seen in got.values() if seen.startswith(b"SSH-"))
    stats["max_open"] = max(stats["max_open"], stats["open"])
    if time.monotonic() >= next_report:
        print(json.dumps(stats), flush=True)
        next_report = time.monotonic() + 0.5
print(json.dumps(stats), flush=True)
"""


def _flood_status(container: str) -> dict[str, int]:
    lines = [line for line in docker("logs", container, check=False).stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def test_a_flooding_source_does_not_starve_another(start_target, start_proxy, keypair, proxy_image,
                                                  test_network, session_id):
    sfx = secrets.token_hex(3)
    key = keypair("ws")
    target = start_target(f"ws-limits-{sfx}", key)
    proxy = start_proxy(env={"SSH_PERMIT_TARGET_HOST": f"*-{sfx}"})
    client = SshClient(proxy, key, connect_timeout=30)  # from the host: the network's gateway address
    wait_for_login(client, target.name)
    proxy_ip = docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{test_network}").IPAddress}}}}',
                      proxy.id).stdout.strip()

    # The flood comes from another address: a helper container on the test network.
    flood = unique_name("ssh-proxy-test-flood")
    docker("run", "-d", "--name", flood, "--network", test_network, "--label", f"{TEST_LABEL}=1",
           "--label", f"{SESSION_LABEL}={session_id}", "--entrypoint", "python3", proxy_image,
           "-c", _FLOOD, proxy_ip, str(FLOOD_CONNECTIONS), str(FLOOD_LIMIT))
    try:
        # The flood holds all the slots its source may have, and sshd refuses it the rest.
        saturated = wait_until(lambda: _flood_status(flood).get("open", 0) >= 200
                               and _flood_status(flood).get("refused", 0) > 0, 90, interval=1)
        assert saturated, f"flood never saturated its source's slots: {_flood_status(flood)}\n{proxy.logs()[-3000:]}"

        # Meanwhile a login from another address is served.
        login = client.ssh(target.name, "true", timeout=90)
        during = _flood_status(flood)
        assert login.returncode == 0, f"login during the flood failed: {login.stderr}\nflood: {during}"
        assert during.get("open", 0) >= 200, f"the flood had let go when the login ended: {during}"
    finally:
        docker("exec", flood, "touch", "/tmp/release", check=False)
        wait_until(lambda: docker("inspect", "-f", "{{.State.Running}}", flood, check=False).stdout.strip()
                   != "true", 30)
        final = _flood_status(flood)
        remove_container(flood)
    # One source never got more than its share, and its share covers a 200-login burst.
    assert 200 <= final["max_open"], final
    assert final["refused"] > 0, final
