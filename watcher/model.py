"""Values passed between the sources, the core and the outputs (all frozen)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class PublicKey:
    """One validated public key: `<type> <base64 blob> [comment]`."""

    key_type: str  # e.g. "ssh-ed25519"
    blob_b64: str  # base64 of the wire-format blob, exactly as given
    comment: str = ""
    fingerprint: str = ""  # "SHA256:<unpadded base64>", as sshd logs and passes as %f
    bits: int = 0  # key size where it means something (rsa, ecdsa), else 0

    def line(self) -> str:
        """The key as an authorized_keys key part, without options or comment."""
        return f"{self.key_type} {self.blob_b64}"


@dataclass(frozen=True, slots=True)
class Target:
    """A container or pod that may be reached through the proxy.

    `aliases` are every name or address a client may ask the proxy to connect to for
    this target (before conflict resolution); `address` is where the proxy itself
    reaches it (to fetch its key, and what the aliases resolve to).
    """

    id: str
    name: str
    address: str = ""  # IP on a network shared with the proxy; "" when there is none
    hostname: str = ""
    aliases: tuple[str, ...] = ()  # network aliases (chosen by whoever runs the target)
    addresses: tuple[str, ...] = ()  # its other own IPs on networks shared with the proxy
    labels: tuple[tuple[str, str], ...] = ()
    source: str = "docker"
    started_at: str = ""  # changes on restart: a restarted target's key is fetched again
    # The id as Docker shows it (12 characters), made once: the alias book, the hosts rows
    # and the status rows all hold it (at 100k targets, three copies were ~12 MB more).
    short_id: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "short_id", self.id[:12])

    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True, slots=True)
class ManualLine:
    """A validated line from an admin-maintained key file (kept with its origin)."""

    origin: str  # "file:line"
    options: tuple[str, ...]  # admin options kept as written (already checked)
    key: PublicKey


@dataclass(frozen=True, slots=True)
class KeyState:
    """What is known about one target's keys."""

    keys: tuple[PublicKey, ...] = ()
    status: str = "pending"  # pending | ok | failed
    error: str = ""
    via: str = ""  # "http" or "exec"
    rejected: tuple[str, ...] = field(default=())  # reasons for rejected lines
