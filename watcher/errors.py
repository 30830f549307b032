"""One error type per boundary; each is caught once, at the top, where the user sees it."""


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
