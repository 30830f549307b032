"""Values passed between the sources, the core and the outputs (all frozen)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable


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


class LineNumber:
    """A line's number in its file (1-based), kept in place: when an edit above a line moves
    it, the key file source updates this number instead of making the line again. So a line
    inserted at the top of a 100k-line file leaves every later line the same object, and
    the reconciler sees (and renders) one changed line. Whatever shows a line's origin
    formats it when shown, never keeps the text (access log owners, reservations)."""

    __slots__ = ("value",)

    def __init__(self, value: int) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"LineNumber({self.value})"


@dataclass(frozen=True, slots=True, eq=False)
class ManualLine:
    """A validated line from an admin-maintained key file, with where it is.

    A line is itself, compared and hashed by identity: its number moves, and two lines of
    the same text can hold the same number for a moment (one just deleted, one just moved
    up to its place), where equal values would let the reconciler keep the deleted one and
    drop the one still in the file. The source hands over the same object for as long as
    the line stays in its file (see LineNumber)."""

    path: str  # the key file
    options: tuple[str, ...]  # admin options kept as written (already checked)
    key: PublicKey
    number: LineNumber = field(default_factory=lambda: LineNumber(0))

    @classmethod
    def at(cls, origin: str, options: tuple[str, ...], key: PublicKey) -> ManualLine:
        """The line at `origin` ("file:line"; a bare name: no line number)."""
        path, _, number = origin.rpartition(":")
        if path and number.isdigit():
            return cls(path, options, key, LineNumber(int(number)))
        return cls(origin, options, key)

    @property
    def origin(self) -> str:
        """"file:line", as of now."""
        return f"{self.path}:{self.number.value}" if self.number.value else self.path

    def order(self) -> tuple[str, int]:
        """Files by name, then lines in file order (unchanged when lines move together)."""
        return (self.path, self.number.value)


@dataclass(frozen=True, slots=True)
class KeyState:
    """What is known about one target's keys."""

    keys: tuple[PublicKey, ...] = ()
    status: str = "pending"  # pending | ok | failed
    error: str = ""
    via: str = ""  # "http" or "exec"
    rejected: tuple[str, ...] = field(default=())  # reasons for rejected lines


Owner = str | ManualLine
"""Who a served key belongs to: a target's name, or an admin line (named by its origin when
shown: its line number can move after the owners were worked out)."""


def owner_order(owner: Owner) -> tuple[int, str, int]:
    """Targets by name, then admin lines in file order: an order that lines moving together
    (an insert above them) leaves as it is, so kept tuples stay sorted."""
    if isinstance(owner, str):
        return (0, owner, 0)
    return (1, *owner.order())


def owners_sorted(owners: Iterable[Owner]) -> tuple[Owner, ...]:
    return tuple(sorted(owners, key=owner_order))


def owner_names(owners: Iterable[Owner]) -> tuple[str, ...]:
    """The owners as the access log names them, sorted (admin lines as "file:line" now)."""
    return tuple(sorted({o if isinstance(o, str) else o.origin for o in owners}))
