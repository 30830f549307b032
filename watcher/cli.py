"""`watcher run | health | check-config | status | logs | known-hosts | ssh-config`: the one
place a user-facing error is printed."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rich.console import Console

from . import __version__
from .commands import known_hosts as known_hosts_command
from .commands import logs as logs_command
from .commands import ssh_config as ssh_config_command
from .commands import status as status_command
from .config import load_settings, parse_log_level
from .errors import ConfigError, WatcherError
from .logsetup import setup_logging
from .snapshot import STATUS_PATH

EXIT_OK, EXIT_ERROR, EXIT_CONFIG = 0, 1, 2
PIPE_WIDTH = 200
HELP_FORMAT = argparse.RawDescriptionHelpFormatter  # descriptions and epilogs keep their lines

MAIN_EPILOG = """\
examples (in the proxy's container, e.g. `docker exec ssh-proxy ...`):
  watcher status                       what the proxy serves, and its health
  watcher logs --event denied --since 10m
  watcher health --liveness            for a liveness probe
  docker run --rm -e SSH_PERMIT_TARGET_PORT=22 ssh-proxy watcher check-config

The proxy is configured by environment variables only (README, "Configuration");
`watcher run --help` lists them. Every command has --help."""

RUN_EPILOG = """\
environment variables (README, "Configuration", says more):
  SSH_PERMIT_TARGET_HOST          globs on target names, comma list (default *)
  SSH_PERMIT_TARGET_PORT          ports a tunnel may open: *, 22 or 22,8000 (default *)
  SSH_TARGET_LABELS               k1=v1,k2: only targets with all these labels
  SSH_TARGET_PUBLICKEY_API_PORT   port of the target's GET /publickey (default 8080)
  SSH_TARGET_KEY_PATH             key file read by exec (default ~/.ssh/id_ed25519.pub)
  SSH_TARGET_KEY_SOURCE           api,exec | api | exec (default api,exec)
  MANUAL_AUTH_FILE                true: no discovery, only the keys you maintain
  SSH_PROXY_MODE                  docker | kubernetes | manual (default: detected)
  KUBERNETES_CLUSTER_DOMAIN       the cluster's DNS domain (default cluster.local)
  DOCKER_HOST                     the engine's API (default unix:///var/run/docker.sock)
  SSH_PROXY_SOURCE_OUTAGE_SECONDS exit 1 after this long without the platform (default 60)
  SSH_PROXY_DRAIN_SECONDS         on stop, open tunnels may go on this long (default 8)
  ACCESS_LOG_MAX_BYTES            rotate access.log past this size (default 10485760)
  ACCESS_LOG_BACKUPS              rotated access logs kept (default 5)
  WATCHER_METRICS_PORT            serve Prometheus metrics on this port (default: off)
  WATCHER_LOG_LEVEL               debug for more of the watcher's own log (default info)

exit status: 0 after a stop (SIGTERM, open tunnels drained), 1 when a component
failed (e.g. the platform unreachable for SSH_PROXY_SOURCE_OUTAGE_SECONDS), 2 when
a variable is invalid (one line names it, before sshd listens)."""

CHECK_CONFIG_EPILOG = """\
example:
  docker run --rm -e SSH_PERMIT_TARGET_HOST='ws-*' ssh-proxy watcher check-config

exit status: 0 and `configuration OK`, or 2 and one line naming the variable."""

HEALTH_EPILOG = """\
examples:
  HEALTHCHECK CMD watcher health                 (the image's own)
  readinessProbe: exec: command: [watcher, health]
  livenessProbe:  exec: command: [watcher, health, --liveness]"""


def cmd_run(_: argparse.Namespace) -> int:
    from .app import Supervisor  # imports docker etc. only when running
    from .platforms import gather_facts

    settings = load_settings(os.environ, gather_facts())
    code = Supervisor(settings).run()
    # sshd is stopped and every file is on disk: do not wait for a key fetch still hanging
    # on a slow target (interpreter exit would join the worker threads).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_check_config(_: argparse.Namespace) -> int:
    load_settings(os.environ)  # the variables only: no platform needs to be mounted
    print("configuration OK")
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    from .snapshot import SnapshotError
    from .status import health_problems, read_status, sshd_listening

    try:
        # Without the target rows: at 100k targets building them took ~3 s of the image
        # HEALTHCHECK's 10 s, and health looks at none of them.
        doc = read_status(Path(args.status), targets=False)
    except SnapshotError as exc:
        print(f"unhealthy: {exc}")
        return EXIT_ERROR
    problems = health_problems(doc, time.time(), sshd_listening(args.port),
                               require_source=not args.liveness, port=args.port)
    if problems:
        print("unhealthy: " + "; ".join(problems))
        return EXIT_ERROR
    print("healthy")
    return EXIT_OK


def _log_level() -> str:
    """WATCHER_LOG_LEVEL, validated. A bad value falls back to `info` here: `run` and
    `check-config` then stop on it with exit 2 (load_settings validates it with the other
    variables); the read-only commands (health, status, logs) go on at `info`, so they
    still show what they are asked for."""
    try:
        return parse_log_level(os.environ.get("WATCHER_LOG_LEVEL", "info"))
    except ConfigError:
        return "info"


def _console() -> Console:
    """A terminal's own width; piped or in `docker exec` without -t, wide enough for a row
    per target (COLUMNS overrides). Colour only on a terminal, never with NO_COLOR."""
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else PIPE_WIDTH
    return Console(width=width)


def main(argv: list[str] | None = None, console: Console | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="watcher", formatter_class=HELP_FORMAT, epilog=MAIN_EPILOG,
        description="ssh-proxy watcher: keeps sshd's keys in step with the targets (run),\n"
                    "and shows what it knows (status, logs, health).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="supervise sshd and keep its keys in step with the targets",
                   formatter_class=HELP_FORMAT, epilog=RUN_EPILOG,
                   description="Run the proxy (the image's PID 1): start sshd, discover the "
                               "targets (Docker,\nKubernetes, or only your key files), fetch "
                               "their keys and keep sshd's index,\nthe cache and the /etc/hosts "
                               "block in step; write the access log and the\nstatus snapshot. "
                               "Configured by environment variables only."
                   ).set_defaults(func=cmd_run)
    sub.add_parser("check-config", help="validate the environment variables and exit",
                   formatter_class=HELP_FORMAT, epilog=CHECK_CONFIG_EPILOG,
                   description="Validate every environment variable `watcher run` reads, "
                               "without starting\nanything (no Docker socket or kube config "
                               "needed)."
                   ).set_defaults(func=cmd_check_config)
    health = sub.add_parser("health", help="exit 0 when sshd answers and the watcher is live",
                            formatter_class=HELP_FORMAT, epilog=HEALTH_EPILOG,
                            description="Exit 0 and print `healthy` when the watcher's snapshot "
                                        "is fresh, sshd runs\nand listens, and (unless "
                                        "--liveness) the platform source is connected;\nelse "
                                        "exit 1 and print one line saying why.")
    health.add_argument("--status", default=str(STATUS_PATH), metavar="PATH",
                        help=f"the status snapshot (default {STATUS_PATH})")
    health.add_argument("--port", type=int, default=22, help="sshd's port (default 22)")
    health.add_argument("--liveness", action="store_true",
                        help="only the watcher and sshd (not the platform connection): for "
                             "a liveness probe, so a platform outage never restarts the proxy")
    health.set_defaults(func=cmd_health)
    status_command.add_parser(sub)
    logs_command.add_parser(sub)
    known_hosts_command.add_parser(sub)
    ssh_config_command.add_parser(sub)
    args = parser.parse_args(argv)
    setup_logging(_log_level())
    try:
        if getattr(args, "needs_console", False):
            return args.func(args, console or _console())
        return args.func(args)
    except ConfigError as exc:
        print(f"ssh-proxy: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except WatcherError as exc:
        print(f"ssh-proxy: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
