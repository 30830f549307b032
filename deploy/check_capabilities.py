"""Re-checks the Deployment's capability list against the real image, with Docker.

    python3 deploy/check_capabilities.py --image ssh-proxy:test --target-image ssh-proxy-target:test

Reads the capabilities the kustomize base grants (`kubectl kustomize deploy/kubernetes`),
then starts the proxy as the pod would run: `--cap-drop ALL` plus exactly those,
no-new-privileges, unprivileged ports from 1024 (as on a cluster node), the host keys
read-only in a Secret volume's layout (`..data` symlinks, mode 0400), and, so that no
Docker socket or API server is needed, MANUAL_AUTH_FILE=true with a mounted key file. It
logs in through the proxy to a target container (tests/images/target), and kills a
`limited-user` session process from inside the proxy. Then it drops each capability in
turn and shows what breaks. Exit status 0 when the full set works and every capability
is needed. Talks only to 127.0.0.1 and containers it starts; removes them at the end.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SSH_OPTS = ["-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=10"]
HOST_KEYS = (("ed25519", []), ("ecdsa", ["-b", "256"]), ("rsa", ["-b", "3072"]))


@dataclass(frozen=True)
class Outcome:
    login: bool
    kill: bool
    detail: str


def run(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        sys.exit(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def manifest_capabilities() -> list[str]:
    docs = yaml.safe_load_all(run("kubectl", "kustomize", str(REPO / "deploy" / "kubernetes")).stdout)
    deployment = next(d for d in docs if d and d["kind"] == "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return list(container["securityContext"]["capabilities"]["add"])


def secret_volume(directory: Path) -> Path:
    """Host keys laid out as the kubelet lays out a Secret volume: files are symlinks into
    `..data`, which points at a timestamped directory of mode-0400 files."""
    data = directory / "..2026_01_01_00_00_00.000000000"
    data.mkdir(parents=True)
    for kind, extra in HOST_KEYS:
        name = f"ssh_host_{kind}_key"
        run("ssh-keygen", "-q", "-t", kind, *extra, "-N", "", "-C", "check", "-f", str(data / name))
        (data / f"{name}.pub").unlink()
        (data / name).chmod(0o400)
        (directory / name).symlink_to(f"..data/{name}")
    (directory / "..data").symlink_to(data.name)
    return directory


def banner(port: int) -> str:
    """sshd's first line on 127.0.0.1:port (sent before any privilege separation), or ``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.settimeout(2)
            return sock.recv(256).decode(errors="replace")
    except OSError:
        return ""


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][-200:] if lines else ""


def wait_for_banner(name: str, deadline: float = 30) -> int | None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        mapped = run("docker", "port", name, "22/tcp", check=False).stdout.split()
        if mapped:
            port = int(mapped[0].rsplit(":", 1)[1])
            if banner(port).startswith("SSH-"):
                return port
        if run("docker", "inspect", "-f", "{{.State.Running}}", name, check=False).stdout.strip() != "true":
            return None
        time.sleep(0.5)
    return None


def limited_user_pid(name: str) -> str:
    script = ('for p in /proc/[0-9]*; do u=$(awk \'/^Uid/{print $2}\' $p/status 2>/dev/null); '
              '[ -n "$u" ] && [ "$u" != 0 ] && basename $p; done')
    pids = run("docker", "exec", name, "sh", "-c", script, check=False).stdout.split()
    return pids[0] if pids else ""


def try_capabilities(caps: list[str], args: argparse.Namespace, work: Path, network: str,
                     target: str) -> Outcome:
    name = f"ssh-proxy-capcheck-{secrets.token_hex(4)}"
    cap_args = [a for cap in caps for a in ("--cap-add", cap)]
    run("docker", "run", "-d", "--name", name, "--network", network, "--label", "ssh-proxy-test=1",
        "-p", "127.0.0.1::22", "--cap-drop", "ALL", *cap_args,
        "--security-opt", "no-new-privileges", "--sysctl", "net.ipv4.ip_unprivileged_port_start=1024",
        "-e", "MANUAL_AUTH_FILE=true",
        "-v", f"{work / 'keys.d'}:/etc/ssh/authorized_keys.d:ro",
        "-v", f"{work / 'host_keys'}:/etc/ssh/host_keys:ro", args.image)
    try:
        port = wait_for_banner(name)
        if port is None:
            tail = run("docker", "logs", "--tail", "1", name, check=False)
            return Outcome(False, False, "proxy never served SSH: " + last_line(tail.stdout + tail.stderr))
        key = str(work / "client")
        hop = " ".join(["ssh", *SSH_OPTS, "-i", key, "-W", "%h:%p", "-p", str(port), "limited-user@127.0.0.1"])
        session = subprocess.Popen(["ssh", *SSH_OPTS, "-i", key, "-o", f"ProxyCommand={hop}",
                                    f"root@{target}", "echo logged-in; sleep 30"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert session.stdout is not None
            line = session.stdout.readline().strip()  # blocks until the login or its failure
            if line != "logged-in":
                session.wait(timeout=30)
                return Outcome(False, False, f"login failed: {last_line(session.stderr.read())}")
            pid = limited_user_pid(name)
            killed = run("docker", "exec", name, "kill", "-TERM", pid, check=False) if pid else None
            ok = killed is not None and killed.returncode == 0
            return Outcome(True, ok, "session killed" if ok else
                           f"kill of limited-user pid {pid or '?'}: {killed.stderr.strip() if killed else 'none found'}")
        finally:
            session.kill()
            session.wait()
    finally:
        run("docker", "rm", "-f", name, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=os.environ.get("SSH_PROXY_TEST_PROXY_IMAGE", "ssh-proxy:test"))
    parser.add_argument("--target-image",
                        default=os.environ.get("SSH_PROXY_TEST_TARGET_IMAGE", "ssh-proxy-target:test"))
    args = parser.parse_args()
    caps = manifest_capabilities()
    suffix = secrets.token_hex(4)
    network, target = f"ssh-proxy-capcheck-{suffix}", f"capcheck-target-{suffix}"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "capcheck", "-f", str(work / "client"))
        public = (work / "client.pub").read_text().strip()
        (work / "keys.d").mkdir()
        (work / "keys.d" / "client.pub").write_text(public + "\n")
        secret_volume(work / "host_keys")
        run("docker", "network", "create", "--label", "ssh-proxy-test=1", network)
        try:
            run("docker", "run", "-d", "--name", target, "--network", network, "--label", "ssh-proxy-test=1",
                "-e", f"TARGET_PUBKEY={public}", args.target_image)
            time.sleep(2)  # the target's sshd starts; a failed login below says so if not
            full = try_capabilities(caps, args, work, network, target)
            print(f"{' '.join(caps):<48} login={'yes' if full.login else 'NO'} "
                  f"kill={'yes' if full.kill else 'NO'}  {full.detail}")
            needed = True
            for cap in caps if full.login and full.kill else []:
                fewer = try_capabilities([c for c in caps if c != cap], args, work, network, target)
                print(f"{'without ' + cap:<48} login={'yes' if fewer.login else 'NO'} "
                      f"kill={'yes' if fewer.kill else 'NO'}  {fewer.detail}")
                needed &= not (fewer.login and fewer.kill)
        finally:
            run("docker", "rm", "-f", target, check=False)
            run("docker", "network", "rm", network, check=False)
    works = full.login and full.kill
    print("the manifest's capabilities " + ("work, and each is needed" if works and needed else
                                            "work, but some are not needed" if works else "do NOT work"))
    return 0 if works and needed else 1


if __name__ == "__main__":
    sys.exit(main())
