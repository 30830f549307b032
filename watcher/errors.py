"""One error type per boundary; each is caught once, at the top, where the user sees it."""

from __future__ import annotations

import errno
import os


class WatcherError(Exception):
    """Base of every error the watcher raises on purpose."""


class ConfigError(WatcherError):
    """An environment variable or input file has a value the watcher cannot use."""


class KeyRejected(WatcherError):
    """A public-key line failed validation; the message says why."""


class SourceError(WatcherError):
    """A discovery source (Docker, Kubernetes, files) failed; the message says which and how."""


class FetchError(WatcherError):
    """A target's public key could not be had; the message says which way was tried."""


class FetchTimeout(FetchError):
    """A key source started answering but did not finish in time (hangs, drips)."""


def explain_os_error(exc: OSError) -> str:
    """One line for a file-system error at start-up: the path, the kernel's words and what
    to do about it (the usual causes: a read-only or wrong mount, a full disk)."""
    path = exc.filename or ""
    what = f"cannot use {path}: {exc.strerror or exc}" if path else f"{exc.strerror or exc}"
    where = os.path.dirname(str(path)) or str(path)
    hints = {
        errno.EROFS: f"its file system is read-only: mount {where} writable, or put a tmpfs "
                     f"on it (e.g. --tmpfs {where} with --read-only)",
        errno.EACCES: f"make {path} writable by root (check the mount's options and owner)",
        errno.EPERM: f"make {path} writable by root (check the mount's options and owner)",
        errno.ENOTDIR: f"a directory is expected on the way to {path}: remove the file in its "
                       "place or fix the mount",
        errno.EEXIST: f"{path} must be a directory: remove the file in its place or fix the mount",
        errno.ENOSPC: f"free space on the file system holding {where}",
        errno.EDQUOT: f"free space on the file system holding {where}",
        errno.ENOENT: f"{path} is missing: check the image and the mounts",
    }
    hint = hints.get(exc.errno or 0, f"check the mounts and permissions of {path}" if path
                     else "check the container's limits and mounts")
    return f"{what}; {hint}"
