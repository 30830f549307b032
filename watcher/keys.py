"""Public-key text -> PublicKey. Pure and strict.

Whatever these functions accept ends up in sshd's authorized keys, so anything sshd might
read differently from us (options smuggled before the type, a CR that starts a second
line, a blob with extra bytes) is rejected, with a reason short enough for one log line.
Stdlib only; nothing here does I/O.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import ipaddress
import re
import struct
from collections.abc import Callable

from .errors import KeyRejected
from .model import PublicKey

__all__ = [
    "SUPPORTED_TYPES",
    "fingerprint",
    "parse_public_key",
    "parse_key_body",
    "parse_authorized_keys_line",
]

MAX_LINE = 16384
MAX_COMMENT = 256
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 16384  # OpenSSH's own ceiling (SSH_RSA_MAXIMUM_MODULUS_SIZE)

# NIST prime curves (all a = -3): name -> (bits, uncompressed point length, p, b).
# p and b let us check that the point is on the curve, as sshd does before using a key.
_CURVES: dict[str, tuple[int, int, int, int]] = {
    "nistp256": (
        256, 65,
        2**256 - 2**224 + 2**192 + 2**96 - 1,
        0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B,
    ),
    "nistp384": (
        384, 97,
        2**384 - 2**128 - 2**96 + 2**32 - 1,
        int("B3312FA7E23EE7E4988E056BE3F82D19181D9C6EFE8141120314088F5013875A"
            "C656398D8A2ED19D2A85C8EDD3EC2AEF", 16),
    ),
    "nistp521": (
        521, 133,
        2**521 - 1,
        int("0051953EB9618E1C9A1F929A21A0B68540EEA2DA725B99B315F3B8B489918EF1"
            "09E156193951EC7E937B1652C0BD3BB1BF073573DF883D2C34F1EF451FD46B50"
            "3F00", 16),
    ),
}

_ECDSA_TYPES = {f"ecdsa-sha2-{curve}": curve for curve in _CURVES}
SUPPORTED_TYPES = frozenset({
    "ssh-ed25519",
    *_ECDSA_TYPES,
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
})

_FIELD_SEP = re.compile(r"[ \t]+")
# C0 except TAB (a field separator), DEL and C1: each could end or rewrite a line in sshd
# or in a terminal showing our logs.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
# Names that look like key types rather than options, so the error can name the type.
_KEY_TYPE_SHAPE = re.compile(r"(?:ssh|ecdsa|sk|rsa|x509v3)-[A-Za-z0-9@._-]+")
_CERT_SUFFIX = "-cert-v01@openssh.com"

# authorized_keys options (names compare case-insensitively, as in OpenSSH).
_FLAG_OPTIONS = frozenset({
    "restrict", "port-forwarding", "no-port-forwarding", "no-agent-forwarding",
    "no-x11-forwarding", "no-pty", "no-user-rc", "no-touch-required", "verify-required",
})
# Anything that lets a key do more than open the tunnels it is meant for.
_FORBIDDEN_OPTIONS = frozenset({
    "command", "permitlisten", "agent-forwarding", "pty", "x11-forwarding", "user-rc",
    "tunnel", "environment", "cert-authority", "principals",
})
_OPTION_NAMES = _FLAG_OPTIONS | _FORBIDDEN_OPTIONS | {"permitopen", "from", "expiry-time"}
_OPTION_NAME = re.compile(r'[^=,"\s]+')
_HOST_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?")
_EXPIRY = re.compile(r"(\d{4})(\d{2})(\d{2})(?:(\d{2})(\d{2})(\d{2})?)?Z?")


def fingerprint(blob: bytes) -> str:
    """The SHA256 fingerprint exactly as `ssh-keygen -lf` prints it and sshd passes as %f."""
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def parse_public_key(line: str) -> PublicKey:
    """`<type> <base64 blob> [comment]` -> PublicKey, or KeyRejected saying why not."""
    _check_line(line)
    fields = _FIELD_SEP.split(line.strip(" \t"), maxsplit=2)
    if fields == [""]:
        raise KeyRejected("empty line")
    key_type = fields[0]
    _check_key_type(key_type)
    if len(fields) < 2:
        raise KeyRejected(f"no key blob after the key type {key_type}")
    blob_b64 = fields[1]
    blob = _decode_blob(blob_b64)
    bits = _parse_blob(key_type, blob)
    comment = _check_comment(fields[2] if len(fields) > 2 else "")
    return PublicKey(key_type, blob_b64, comment, fingerprint(blob), bits)


def parse_key_body(body: bytes, *, max_bytes: int = 65536,
                   max_keys: int = 32) -> tuple[list[PublicKey], list[str]]:
    """A /publickey body or key file -> (valid keys, "line N: reason" for each bad line).

    Problems with the body as a whole (size, encoding, NUL, too many keys) raise
    KeyRejected: such a target is misbehaving and none of its lines is trusted.
    """
    if len(body) > max_bytes:
        raise KeyRejected(f"body of {len(body)} bytes exceeds the {max_bytes}-byte limit")
    if b"\x00" in body:
        raise KeyRejected(f"NUL byte at offset {body.index(0)} in body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeyRejected(f"body is not valid UTF-8 (byte offset {exc.start})") from None

    candidates: list[tuple[int, str]] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.endswith("\r"):
            line = line[:-1]  # CRLF files are common; any other CR is rejected per line
        content = line.strip(" \t")
        if content and not content.startswith("#"):
            candidates.append((number, line))
    # Counted before parsing so a flood of junk costs nothing to refuse.
    if len(candidates) > max_keys:
        raise KeyRejected(f"{len(candidates)} keys; at most {max_keys} per target")

    keys: list[PublicKey] = []
    rejected: list[str] = []
    seen: set[str] = set()
    for number, line in candidates:
        try:
            key = parse_public_key(line)
        except KeyRejected as exc:
            rejected.append(f"line {number}: {exc}")
            continue
        # The base64 is checked to be canonical, so equal blobs have equal text.
        if key.blob_b64 not in seen:
            seen.add(key.blob_b64)
            keys.append(key)
    return keys, rejected


def parse_authorized_keys_line(line: str) -> tuple[tuple[str, ...], PublicKey]:
    """`[options] <type> <blob> [comment]` -> (kept options, key), or KeyRejected.

    Options are split the way sshd splits them; only those that restrict a key or name
    the tunnels it may open are kept (name lowercased, value exactly as written).
    """
    _check_line(line)
    text = line.strip(" \t")
    first = _FIELD_SEP.split(text, maxsplit=1)[0]
    # Like sshd, a line that starts with a key type has no options.
    if not text or first in SUPPORTED_TYPES or _KEY_TYPE_SHAPE.fullmatch(first):
        return (), parse_public_key(text)
    options, rest = _split_options(text)
    rest = rest.lstrip(" \t")
    if not rest:
        raise KeyRejected("no key after the options")
    if sum(1 for o in options if o.startswith("from=")) > 1:
        # sshd refuses such a line outright ("multiple from clauses"): say so here.
        raise KeyRejected("option 'from' given twice (sshd refuses the line); "
                          "list all patterns in one from=\"a,b\"")
    return tuple(options), parse_public_key(rest)


# --- line and field checks -----------------------------------------------------------

def _check_line(line: str) -> None:
    if len(line) > MAX_LINE:
        raise KeyRejected(f"line of {len(line)} characters exceeds the "
                          f"{MAX_LINE}-character limit")
    bad = _CONTROL.search(line)
    if bad:
        raise KeyRejected(f"control character U+{ord(bad.group()):04X} in line")


def _check_ascii(text: str, where: str) -> None:
    bad = _NON_ASCII.search(text)
    if bad:
        raise KeyRejected(f"non-ASCII character U+{ord(bad.group()):04X} in {where}")


def _show(text: str, limit: int = 40) -> str:
    """Quote a field for a reason without letting a huge one flood the log."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _check_key_type(key_type: str) -> None:
    _check_ascii(key_type, "key type")
    if key_type in SUPPORTED_TYPES:
        return
    if any(c in key_type for c in '=",') or _is_option_name(key_type):
        raise KeyRejected("options are not allowed before the key type")
    if key_type.endswith(_CERT_SUFFIX):
        raise KeyRejected(f"certificate key type {_show(key_type)} is not supported")
    raise KeyRejected(f"unsupported key type {_show(key_type)}")


def _is_option_name(word: str) -> bool:
    name = word.lower()
    return name in _OPTION_NAMES or (name.startswith("no-") and name[3:] in _OPTION_NAMES)


def _check_comment(rest: str) -> str:
    comment = _FIELD_SEP.sub(" ", rest)
    _check_ascii(comment, "comment")
    if len(comment) > MAX_COMMENT:
        raise KeyRejected(f"comment of {len(comment)} characters exceeds the "
                          f"{MAX_COMMENT}-character limit")
    return comment


def _decode_blob(blob_b64: str) -> bytes:
    _check_ascii(blob_b64, "key blob")
    try:
        blob = base64.b64decode(blob_b64, validate=True)
    except binascii.Error as exc:
        raise KeyRejected(f"key blob is not valid base64: {exc}") from None
    # b64decode tolerates non-zero pad bits; one blob must have exactly one spelling so
    # that de-duplication and the rendered line agree with the fingerprint.
    if base64.b64encode(blob).decode("ascii") != blob_b64:
        raise KeyRejected("key blob is not canonical base64")
    return blob


# --- SSH wire format (RFC 4251 section 5) ---------------------------------------------

class _Wire:
    """Reads length-prefixed fields from a key blob; every short read is a rejection."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def string(self, what: str) -> bytes:
        data, pos = self._data, self._pos
        if len(data) - pos < 4:
            raise KeyRejected(f"truncated key blob (reading the {what})")
        (size,) = struct.unpack_from(">I", data, pos)
        if size > len(data) - pos - 4:
            raise KeyRejected(f"truncated key blob (reading the {what})")
        self._pos = pos + 4 + size
        return data[pos + 4:self._pos]

    def mpint(self, what: str) -> int:
        raw = self.string(what)
        if raw and raw[0] & 0x80:
            raise KeyRejected(f"negative {what}")
        # A leading zero byte is only there to keep the sign bit clear.
        if raw[:1] == b"\x00" and (len(raw) == 1 or not raw[1] & 0x80):
            raise KeyRejected(f"{what} has a superfluous leading zero byte")
        return int.from_bytes(raw, "big")

    def finish(self, key_type: str) -> None:
        extra = len(self._data) - self._pos
        if extra:
            raise KeyRejected(f"{extra} trailing bytes after the {key_type} key")


def _parse_blob(key_type: str, blob: bytes) -> int:
    """Check the whole blob against the declared type; returns the key's bit size."""
    wire = _Wire(blob)
    embedded = wire.string("key type")
    if embedded != key_type.encode("ascii"):
        said = embedded.decode("ascii", "replace")
        shown = said if said and said.isprintable() else repr(embedded)
        raise KeyRejected(f"type mismatch: line says {key_type}, key blob says {shown}")

    if key_type == "ssh-rsa":
        bits = _rsa(wire)
    elif key_type in _ECDSA_TYPES:
        bits = _ecdsa(wire, _ECDSA_TYPES[key_type])
    elif key_type == "sk-ecdsa-sha2-nistp256@openssh.com":
        bits = _ecdsa(wire, "nistp256")
        _application(wire)
    else:  # ssh-ed25519 and its security-key form
        key = wire.string("ed25519 public key")
        if len(key) != 32:
            raise KeyRejected(f"ed25519 public key of {len(key)} bytes; expected 32")
        bits = 256
        if key_type.startswith("sk-"):
            _application(wire)
    wire.finish(key_type)
    return bits


def _rsa(wire: _Wire) -> int:
    e = wire.mpint("RSA exponent")
    n = wire.mpint("RSA modulus")
    if e < 3 or e % 2 == 0:
        raise KeyRejected(f"RSA exponent {e if e < 2**32 else 'of that size'} is not "
                          "an odd number >= 3")
    bits = n.bit_length()
    if bits < MIN_RSA_BITS:
        raise KeyRejected(f"RSA key of {bits} bits; at least {MIN_RSA_BITS} required")
    if bits > MAX_RSA_BITS:
        raise KeyRejected(f"RSA key of {bits} bits; at most {MAX_RSA_BITS} allowed")
    return bits


def _ecdsa(wire: _Wire, curve: str) -> int:
    bits, size, p, b = _CURVES[curve]
    named = wire.string("curve name")
    if named != curve.encode("ascii"):
        shown = named.decode("ascii", "replace")
        raise KeyRejected(f"curve {shown if shown.isprintable() else repr(named)} "
                          f"does not match the key type ({curve})")
    point = wire.string("ECDSA point")
    if point[:1] != b"\x04":
        raise KeyRejected("ECDSA point is not in uncompressed form")
    if len(point) != size:
        raise KeyRejected(f"ECDSA point of {len(point)} bytes; {curve} needs {size}")
    half = (size - 1) // 2
    x = int.from_bytes(point[1:1 + half], "big")
    y = int.from_bytes(point[1 + half:], "big")
    if x >= p or y >= p or (y * y - (x * x * x - 3 * x + b)) % p:
        raise KeyRejected(f"ECDSA point is not on the {curve} curve")
    return bits


def _application(wire: _Wire) -> None:
    app = wire.string("security key application")
    if not app or any(not 0x20 <= c <= 0x7E for c in app):
        raise KeyRejected("security key application must be non-empty printable ASCII")


# --- authorized_keys options ----------------------------------------------------------

def _split_options(text: str) -> tuple[list[str], str]:
    """Split and check the options prefix; returns (kept options, rest of the line).

    Mirrors sshd: options run to the first space or tab outside double quotes, and
    inside quotes `\\"` is a literal quote.
    """
    kept: list[str] = []
    pos = 0
    while True:
        match = _OPTION_NAME.match(text, pos)
        if not match:
            raise KeyRejected(f"malformed options: expected an option name at column {pos + 1}")
        name, pos = match.group(), match.end()
        raw_value = None
        if text.startswith("=", pos):
            pos += 1
            if not text.startswith('"', pos):
                raise KeyRejected(f"option {name!r} needs a value in double quotes")
            end = pos + 1
            while end < len(text) and text[end] != '"':
                end += 2 if text.startswith('\\"', end) else 1
            if end >= len(text):
                raise KeyRejected(f"unbalanced quotes in the value of option {name!r}")
            raw_value, pos = text[pos:end + 1], end + 1
        kept.append(_check_option(name, raw_value))
        if pos >= len(text) or text[pos] in " \t":
            return kept, text[pos:]
        if text[pos] != ",":
            raise KeyRejected(f"malformed options: unexpected {text[pos]!r} after option {name!r}")
        pos += 1


def _check_option(name: str, raw_value: str | None) -> str:
    """One option -> its kept text, or KeyRejected. raw_value includes its quotes."""
    lower = name.lower()
    if lower in _FORBIDDEN_OPTIONS:
        raise KeyRejected(f"option {name!r} grants more than tunnels")
    if lower in _FLAG_OPTIONS:
        if raw_value is not None:
            raise KeyRejected(f"option {name!r} takes no value")
        return lower
    check = _VALUE_CHECKS.get(lower)
    if check is None:
        raise KeyRejected(f"unknown option {_show(name)}")
    if raw_value is None:
        raise KeyRejected(f"option {name!r} needs a value in double quotes")
    _check_ascii(raw_value, f"option {name!r}")
    check(raw_value[1:-1].replace('\\"', '"'))  # dequoted as sshd does
    return f"{lower}={raw_value}"


def _check_permitopen(value: str) -> None:
    if value.startswith("["):  # [IPv6]:port
        host, sep, port = value[1:].partition("]:")
        try:
            if not re.fullmatch(r"[0-9A-Fa-f:.]+", host):  # no %zone: keep it plain
                raise ValueError
            ipaddress.IPv6Address(host)
        except ValueError:
            raise KeyRejected(f"permitopen {_show(value)}: {_show(host)} is not an IPv6 "
                              "address") from None
    elif value.count(":") > 1:
        raise KeyRejected(f"permitopen {_show(value)}: expected host:port "
                          "(an IPv6 host goes in [brackets])")
    else:
        host, sep, port = value.partition(":")
        if host == "*":
            raise KeyRejected(f"permitopen {_show(value)}: the host may not be '*'")
        if not _HOST_NAME.fullmatch(host):
            raise KeyRejected(f"permitopen {_show(value)}: {_show(host)} is not a host "
                              "name or address")
        if re.fullmatch(r"[0-9.]+", host):  # all digits and dots: must be a real IPv4
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise KeyRejected(f"permitopen {_show(value)}: {_show(host)} is not an "
                                  "IPv4 address") from None
    if not sep:
        raise KeyRejected(f"permitopen {_show(value)}: expected host:port")
    if port != "*" and not (re.fullmatch(r"[0-9]{1,5}", port) and 1 <= int(port) <= 65535):
        raise KeyRejected(f"permitopen {_show(value)}: port {_show(port)} is not '*' "
                          "or 1-65535")


def _check_from(value: str) -> None:
    if not value:
        raise KeyRejected("option 'from' has an empty pattern list")
    if '"' in value or _CONTROL.search(value) or "\t" in value:
        raise KeyRejected(f"option 'from' value {_show(value)} contains a quote or "
                          "control character")


def _check_expiry(value: str) -> None:
    match = _EXPIRY.fullmatch(value)
    try:
        if not match:
            raise ValueError
        datetime.datetime(*(int(part) for part in match.groups() if part is not None))
    except ValueError:
        raise KeyRejected(f"expiry-time {_show(value)} is not YYYYMMDD[HHMM[SS]][Z]") from None


_VALUE_CHECKS: dict[str, Callable[[str], None]] = {
    "permitopen": _check_permitopen,
    "from": _check_from,
    "expiry-time": _check_expiry,
}
