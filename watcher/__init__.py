"""ssh-proxy watcher: keeps sshd's key index in step with the targets that are running."""

__version__ = "0.1.0"
