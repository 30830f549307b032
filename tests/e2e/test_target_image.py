"""Smoke tests of the test target image alone (no proxy): if these fail, a failing proxy
test says nothing about the proxy."""

from __future__ import annotations

import subprocess

from helpers import (NO_PROMPT_OPTS, SshClient, fetch, free_port, port_open, sshfs_mount, wait_for_login,
                     wait_until)


def direct_ssh(target, key, *cmd: str) -> subprocess.CompletedProcess:
    """ssh straight to the target's IP from the host, same options as through the proxy."""
    argv = ["ssh", "-i", str(key.private), *NO_PROMPT_OPTS, "-o", "ConnectTimeout=10",
            f"root@{target.ip}", *cmd]
    return SshClient.run(argv, timeout=60)


def test_ssh_login_and_publickey_api(start_target, keypair):
    key = keypair("owner")
    target = start_target("smoke-target-a", key)

    login = direct_ssh(target, key, "hostname")
    assert login.returncode == 0, login.stderr
    assert login.stdout.strip() == "smoke-target-a"

    status, body = fetch(f"http://{target.ip}:8080/publickey")
    assert status == 200
    assert body.decode().strip() == key.public

    status, _ = fetch(f"http://{target.ip}:8080/other")
    assert status == 404

    exec_key = target.exec(["cat", "/root/.ssh/id_ed25519.pub"], check=True)
    assert exec_key.stdout.strip() == key.public

    modes = target.exec(["stat", "-c", "%a %n", "/root/.ssh", "/root/.ssh/authorized_keys"], check=True)
    assert modes.stdout.split("\n")[:2] == ["700 /root/.ssh", "600 /root/.ssh/authorized_keys"]

    hello = target.exec(["python3", "-c", "import urllib.request; print(urllib.request.urlopen("
                         "'http://127.0.0.1:8000/hello.txt').read().decode(), end='')"], check=True)
    assert hello.stdout.strip() == "hello from smoke-target-a"


def test_other_key_is_refused(start_target, keypair):
    owner, stranger = keypair("owner"), keypair("stranger")
    target = start_target("smoke-target-b", owner, serve_publickey=False)
    refused = direct_ssh(target, stranger, "true")
    assert refused.returncode == 255
    assert "Permission denied" in refused.stderr


def test_body_file_is_served(start_target, keypair, tmp_path):
    key = keypair("owner")
    body = tmp_path / "body"
    body.write_bytes(b"not a key\x00\xff" + b"A" * 5000)
    target = start_target("smoke-target-c", key, body_file=body)
    status, served = fetch(f"http://{target.ip}:8080/publickey")
    assert (status, served) == (200, body.read_bytes())
    # the file is read on every request
    body.write_text("changed\n")
    assert fetch(f"http://{target.ip}:8080/publickey") == (200, b"changed\n")


def test_without_publickey_api_port_8080_is_closed(start_target, keypair):
    key = keypair("owner")
    target = start_target("smoke-target-d", key, serve_publickey=False)
    assert not port_open(target.ip, 8080)
    exec_key = target.exec(["cat", "/root/.ssh/id_ed25519.pub"], check=True)
    assert exec_key.stdout.strip() == key.public


def test_client_helpers_through_a_jump_target(start_target, keypair, tmp_path, xvfb_display):
    """Every SshClient command shape works when the hop is a plain sshd (a target used as
    jump host, root instead of limited-user): a proxy test failing on these is the proxy."""
    key = keypair("owner")
    jump = start_target("smoke-jump", key, serve_publickey=False)
    start_target("smoke-dest", key, serve_publickey=False)
    client = SshClient(proxy_port=22, key=key, proxy_host=jump.ip, proxy_user="root")

    assert wait_for_login(client, "smoke-dest", deadline=15) < 15
    assert client.ssh("smoke-dest", "hostname", check=True).stdout.strip() == "smoke-dest"
    assert client.direct_proxy("hostname", check=True).stdout.strip() == "smoke-jump"

    (tmp_path / "up.txt").write_text("payload\n")
    client.run(client.scp_argv(str(tmp_path / "up.txt"), client.remote("smoke-dest", "/tmp/scp.txt")), check=True)
    client.run(client.sftp_argv("smoke-dest", opts=["-b", "-"]), check=True,
               input=f"get /tmp/scp.txt {tmp_path / 'sftp.txt'}\n")
    assert (tmp_path / "sftp.txt").read_text() == "payload\n"
    client.run(client.rsync_argv("-a", f"{tmp_path}/", client.remote("smoke-dest", "/tmp/rsync/")), check=True)
    assert "sftp.txt" in client.ssh("smoke-dest", "ls /tmp/rsync", check=True).stdout

    with sshfs_mount(client, "smoke-dest", "/srv/www", tmp_path / "mnt") as mnt:
        assert (mnt / "hello.txt").read_text() == "hello from smoke-dest\n"

    port = free_port()
    tunnel = subprocess.Popen(client.ssh_argv("smoke-dest", opts=["-N", "-o", "ExitOnForwardFailure=yes",
                                                                 "-L", f"127.0.0.1:{port}:127.0.0.1:8000"]),
                              stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: port_open("127.0.0.1", port), 15), "the -L tunnel did not open"
        assert fetch(f"http://127.0.0.1:{port}/hello.txt") == (200, b"hello from smoke-dest\n")
    finally:
        tunnel.terminate()
        tunnel.wait(timeout=10)

    x11 = client.ssh("smoke-dest", "xdpyinfo >/dev/null && echo $DISPLAY", opts=["-X"],
                     env={"DISPLAY": xvfb_display}, check=True)
    assert x11.stdout.strip().startswith("localhost:"), x11
    assert x11.stderr == ""
