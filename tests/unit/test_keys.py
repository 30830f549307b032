"""watcher.keys: real keys from ssh-keygen, hand-built wire-format blobs, every rejection."""

from __future__ import annotations

import base64
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from watcher.errors import KeyRejected
from watcher.keys import (
    SUPPORTED_TYPES,
    fingerprint,
    parse_authorized_keys_line,
    parse_key_body,
    parse_public_key,
)
from watcher.model import PublicKey

SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
P256 = 2**256 - 2**224 + 2**192 + 2**96 - 1
B256 = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B


# --- wire-format helpers ------------------------------------------------------------

def string(data: bytes | str) -> bytes:
    if isinstance(data, str):
        data = data.encode()
    return struct.pack(">I", len(data)) + data


def mpint(n: int) -> bytes:
    # Minimal two's complement: a leading zero byte only when the top bit is set.
    return string(n.to_bytes(n.bit_length() // 8 + 1, "big") if n else b"")


def fields(blob: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(blob):
        (size,) = struct.unpack_from(">I", blob, pos)
        out.append(blob[pos + 4:pos + 4 + size])
        pos += 4 + size
    return out


def b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


def line_of(key_type: str, blob: bytes, comment: str = "") -> str:
    return f"{key_type} {b64(blob)} {comment}".rstrip()


def rsa_blob(e: int, n: int, key_type: str = "ssh-rsa") -> bytes:
    return string(key_type) + mpint(e) + mpint(n)


def rsa_modulus(bits: int) -> int:
    return (1 << (bits - 1)) | 0xC0FFEE | 1  # not a real modulus; only its size matters


def p256_point_with_small_x() -> tuple[int, int]:
    """An on-curve P-256 point whose x is small enough that x + p still fits 32 bytes."""
    x = 1
    while True:
        rhs = (x**3 - 3 * x + B256) % P256
        y = pow(rhs, (P256 + 1) // 4, P256)  # p = 3 mod 4
        if y * y % P256 == rhs:
            return x, y
        x += 1


def p256_point_bytes(x: int, y: int) -> bytes:
    return b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big")


# --- fixtures ------------------------------------------------------------------------

@dataclass(frozen=True)
class Key:
    name: str
    line: str  # as ssh-keygen wrote it, without the newline
    key_type: str
    b64: str
    blob: bytes
    comment: str
    keygen_fingerprint: str  # what `ssh-keygen -lf` prints
    keygen_bits: int


GENERATE = {
    "ed25519": ["-t", "ed25519"],
    "ecdsa256": ["-t", "ecdsa", "-b", "256"],
    "ecdsa384": ["-t", "ecdsa", "-b", "384"],
    "ecdsa521": ["-t", "ecdsa", "-b", "521"],
    "rsa2048": ["-t", "rsa", "-b", "2048"],
    "rsa1024": ["-t", "rsa", "-b", "1024"],
}
ACCEPTED_GENERATED = [name for name in GENERATE if name != "rsa1024"]


def keygen_fingerprint(pub: Path) -> tuple[str, int]:
    out = subprocess.run([SSH_KEYGEN, "-lf", str(pub)], check=True, capture_output=True,
                         text=True, timeout=60).stdout.split()
    return out[1], int(out[0])


def load(name: str, pub: Path) -> Key:
    line = pub.read_text().rstrip("\n")
    key_type, blob_b64, comment = line.split(" ", 2)
    fp, bits = keygen_fingerprint(pub)
    return Key(name, line, key_type, blob_b64, base64.b64decode(blob_b64), comment, fp, bits)


@pytest.fixture(scope="session")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="session")
def keys(keydir: Path) -> dict[str, Key]:
    out = {}
    for name, args in GENERATE.items():
        path = keydir / name
        try:
            subprocess.run([SSH_KEYGEN, "-q", *args, "-N", "", "-C", f"{name}@test",
                            "-f", str(path)], check=True, capture_output=True, timeout=120)
        except subprocess.CalledProcessError:
            if name != "rsa1024":
                raise
            # This OpenSSH refuses to make 1024-bit keys: build the blob by hand instead.
            blob = rsa_blob(65537, rsa_modulus(1024))
            Path(f"{path}.pub").write_text(line_of("ssh-rsa", blob, f"{name}@test") + "\n")
        out[name] = load(name, Path(f"{path}.pub"))
    return out


def sk_blobs(keys: dict[str, Key], application: bytes = b"ssh:") -> dict[str, bytes]:
    """Security-key blobs built from the real ed25519 and P-256 public keys."""
    _, ed_key = fields(keys["ed25519"].blob)
    _, curve, point = fields(keys["ecdsa256"].blob)
    return {
        "sk-ssh-ed25519@openssh.com":
            string("sk-ssh-ed25519@openssh.com") + string(ed_key) + string(application),
        "sk-ecdsa-sha2-nistp256@openssh.com":
            string("sk-ecdsa-sha2-nistp256@openssh.com") + string(curve) + string(point)
            + string(application),
    }


@pytest.fixture(scope="session")
def sk_keys(keys: dict[str, Key], keydir: Path) -> dict[str, Key]:
    out = {}
    for key_type, blob in sk_blobs(keys).items():
        pub = keydir / f"{key_type.split('@')[0]}.pub"
        pub.write_text(line_of(key_type, blob, "sk@test") + "\n")
        out[key_type] = load(key_type, pub)
    return out


# --- fingerprint ---------------------------------------------------------------------

@pytest.mark.parametrize("name", list(GENERATE))
def test_fingerprint_matches_ssh_keygen(keys: dict[str, Key], name: str) -> None:
    assert fingerprint(keys[name].blob) == keys[name].keygen_fingerprint


def test_fingerprint_format() -> None:
    fp = fingerprint(b"anything")
    assert fp.startswith("SHA256:")
    assert "=" not in fp
    assert len(fp) == len("SHA256:") + 43
    assert fp != fingerprint(b"anything else")


# --- accepted keys -------------------------------------------------------------------

@pytest.mark.parametrize("name", ACCEPTED_GENERATED)
def test_generated_key_parses(keys: dict[str, Key], name: str) -> None:
    k = keys[name]
    key = parse_public_key(k.line)
    assert key == PublicKey(k.key_type, k.b64, k.comment, k.keygen_fingerprint, k.keygen_bits)
    assert key.line() == f"{k.key_type} {k.b64}"


@pytest.mark.parametrize("key_type", sorted(t for t in SUPPORTED_TYPES if t.startswith("sk-")))
def test_security_key_parses(sk_keys: dict[str, Key], key_type: str) -> None:
    k = sk_keys[key_type]
    key = parse_public_key(k.line)
    assert key == PublicKey(key_type, k.b64, "sk@test", k.keygen_fingerprint, 256)


def test_every_supported_type_is_exercised(keys: dict[str, Key],
                                           sk_keys: dict[str, Key]) -> None:
    covered = {keys[name].key_type for name in ACCEPTED_GENERATED} | set(sk_keys)
    assert covered == SUPPORTED_TYPES
    assert {parse_public_key(k.line).key_type for k in sk_keys.values()} == set(sk_keys)


@pytest.mark.parametrize("bits", [2048, 3072, 4096, 16384])
def test_rsa_sizes_in_range(bits: int) -> None:
    key = parse_public_key(line_of("ssh-rsa", rsa_blob(65537, rsa_modulus(bits))))
    assert key.bits == bits


@pytest.mark.parametrize("e", [3, 65537, 2**64 + 1])
def test_rsa_odd_exponents(e: int) -> None:
    assert parse_public_key(line_of("ssh-rsa", rsa_blob(e, rsa_modulus(2048)))).bits == 2048


def test_handmade_on_curve_point_accepted() -> None:
    # Guards the off-curve and out-of-range tests below: the crafted point itself is fine.
    point = p256_point_bytes(*p256_point_with_small_x())
    blob = string("ecdsa-sha2-nistp256") + string("nistp256") + string(point)
    assert parse_public_key(line_of("ecdsa-sha2-nistp256", blob)).bits == 256


@pytest.mark.parametrize("template, comment", [
    ("{type}\t{b64}\t{comment}", "c"),
    ("{type} \t {b64} \t\t comment  with \t gaps ", "comment with gaps"),
    ("  \t{type} {b64}  ", ""),
    ("{type} {b64}", ""),
    ("{type} {b64} a=b, \"quoted\" #hash", "a=b, \"quoted\" #hash"),
])
def test_whitespace_and_comment_normalised(keys: dict[str, Key], template: str,
                                           comment: str) -> None:
    k = keys["ed25519"]
    key = parse_public_key(template.format(type=k.key_type, b64=k.b64, comment="c"))
    assert (key.key_type, key.blob_b64, key.comment) == (k.key_type, k.b64, comment)


def test_comment_limit_applies_after_normalising(keys: dict[str, Key]) -> None:
    k = keys["ed25519"]
    assert parse_public_key(f"{k.key_type} {k.b64} {'x' * 256}").comment == "x" * 256
    spaced = "a" + " " * 500 + "b"
    assert parse_public_key(f"{k.key_type} {k.b64} {spaced}").comment == "a b"


def test_long_line_at_limit_accepted() -> None:
    # A 16384-bit key with a full comment still fits the line limit.
    line = line_of("ssh-rsa", rsa_blob(65537, rsa_modulus(16384)), "c" * 256)
    assert len(line) <= 16384
    assert parse_public_key(line).bits == 16384


# --- rejected keys -------------------------------------------------------------------

Maker = Callable[[dict[str, Key]], str]


def ed(keys: dict[str, Key]) -> Key:
    return keys["ed25519"]


def p384(keys: dict[str, Key]) -> Key:
    assert keys["ecdsa384"].b64.endswith("==")  # 136-byte blob: two padding characters
    return keys["ecdsa384"]


def dirty_pad_bits(text: str) -> str:
    """Same bytes, but with a pad bit set: b64decode takes it, canonical base64 does not."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    assert base64.b64decode(text[:-3] + alphabet[alphabet.index(text[-3]) ^ 1] + "==") \
        == base64.b64decode(text)
    return text[:-3] + alphabet[alphabet.index(text[-3]) ^ 1] + "=="


def ed_with_key(key: bytes) -> str:
    return line_of("ssh-ed25519", string("ssh-ed25519") + string(key))


def p256_with(keys: dict[str, Key], *, curve: bytes | None = None, point: bytes | None = None,
              key_type: str = "ecdsa-sha2-nistp256") -> str:
    _, real_curve, real_point = fields(keys["ecdsa256"].blob)
    blob = string(key_type) + string(curve or real_curve) + string(point or real_point)
    return line_of(key_type, blob)


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


REJECTED: list[tuple[str, Maker, str]] = [
    # options smuggled in front of the type
    ("permitopen-prefix", lambda k: f'permitopen="*:*" {ed(k).line}',
     "^options are not allowed before the key type$"),
    ("restrict-prefix", lambda k: f"restrict {ed(k).line}",
     "^options are not allowed before the key type$"),
    ("command-prefix", lambda k: f'command="/bin/sh -i" {ed(k).line}',
     "^options are not allowed before the key type$"),
    ("no-pty-prefix", lambda k: f"no-pty {ed(k).line}",
     "^options are not allowed before the key type$"),
    ("uppercase-option-prefix", lambda k: f"RESTRICT {ed(k).line}",
     "^options are not allowed before the key type$"),
    ("option-list-prefix", lambda k: f"no-pty,no-user-rc {ed(k).line}",
     "^options are not allowed before the key type$"),
    # types
    ("dss", lambda k: line_of("ssh-dss", string("ssh-dss") + mpint(7) * 4),
     "^unsupported key type 'ssh-dss'$"),
    ("ed25519-cert", lambda k: line_of("ssh-ed25519-cert-v01@openssh.com",
                                       string("ssh-ed25519-cert-v01@openssh.com")),
     "^certificate key type 'ssh-ed25519-cert-v01@openssh.com' is not supported$"),
    ("rsa-cert", lambda k: f"ssh-rsa-cert-v01@openssh.com {k['rsa2048'].b64}",
     "^certificate key type 'ssh-rsa-cert-v01@openssh.com' is not supported$"),
    ("unknown-type", lambda k: f"ssh-foo {ed(k).b64}", "^unsupported key type 'ssh-foo'$"),
    ("signature-alg-as-type", lambda k: f"rsa-sha2-256 {k['rsa2048'].b64}",
     "^unsupported key type 'rsa-sha2-256'$"),
    ("garbage-type", lambda k: "hello world", "^unsupported key type 'hello'$"),
    ("huge-type-truncated", lambda k: "x" * 1000 + " AAAA",
     r"^unsupported key type 'x{40}\.\.\.'$"),
    ("uppercase-type", lambda k: ed(k).line.upper(), "^unsupported key type 'SSH-ED25519'$"),
    ("empty", lambda k: "", "^empty line$"),
    ("blank", lambda k: " \t ", "^empty line$"),
    ("no-blob", lambda k: "ssh-ed25519", "^no key blob after the key type ssh-ed25519$"),
    ("no-blob-trailing-space", lambda k: "ssh-ed25519  ", "^no key blob"),
    # base64
    ("invalid-base64-char", lambda k: f"ssh-ed25519 {ed(k).b64[:8]}$${ed(k).b64[10:]}",
     "^key blob is not valid base64"),
    ("urlsafe-base64", lambda k: f"ssh-ed25519 {ed(k).b64[:-4]}-_A=",
     "^key blob is not valid base64"),
    ("missing-padding", lambda k: f"ecdsa-sha2-nistp384 {p384(k).b64.rstrip('=')}",
     "^key blob is not valid base64: Incorrect padding$"),
    ("half-padding", lambda k: f"ecdsa-sha2-nistp384 {p384(k).b64[:-1]}",
     "^key blob is not valid base64: Incorrect padding$"),
    ("excess-padding", lambda k: f"ssh-ed25519 {ed(k).b64}=",
     "^key blob is not canonical base64$"),
    ("padding-in-middle", lambda k: f"ssh-ed25519 AAA={ed(k).b64}",
     "^key blob is not valid base64"),
    ("nonzero-pad-bits", lambda k: f"ecdsa-sha2-nistp384 {dirty_pad_bits(p384(k).b64)}",
     "^key blob is not canonical base64$"),
    # wire format
    ("truncated-blob", lambda k: line_of("ssh-ed25519", ed(k).blob[:-5]),
     r"^truncated key blob \(reading the ed25519 public key\)$"),
    ("truncated-length-prefix", lambda k: line_of("ssh-ed25519", ed(k).blob[:2]),
     r"^truncated key blob \(reading the key type\)$"),
    ("huge-length-prefix", lambda k: line_of("ssh-ed25519", b"\xff\xff\xff\xff" + b"x" * 16),
     r"^truncated key blob \(reading the key type\)$"),
    ("empty-type-string", lambda k: "ssh-ed25519 AAAAAA==",
     "^type mismatch: line says ssh-ed25519, key blob says b''$"),
    ("type-mismatch-rsa-says-ed25519",
     lambda k: f"ssh-rsa {ed(k).b64}",
     "^type mismatch: line says ssh-rsa, key blob says ssh-ed25519$"),
    ("type-mismatch-between-curves",
     lambda k: f"ecdsa-sha2-nistp256 {k['ecdsa384'].b64}",
     "^type mismatch: line says ecdsa-sha2-nistp256, key blob says ecdsa-sha2-nistp384$"),
    ("type-mismatch-sk-plain",
     lambda k: f"sk-ssh-ed25519@openssh.com {ed(k).b64}",
     "^type mismatch: line says sk-ssh-ed25519@openssh.com, key blob says ssh-ed25519$"),
    ("type-mismatch-binary",
     lambda k: line_of("ssh-ed25519", string(b"\x1b[2J") + string(b"x" * 32)),
     r"^type mismatch: line says ssh-ed25519, key blob says b'\\x1b\[2J'$"),
    # ed25519
    ("ed25519-31-bytes", lambda k: ed_with_key(b"\x01" * 31),
     "^ed25519 public key of 31 bytes; expected 32$"),
    ("ed25519-33-bytes", lambda k: ed_with_key(b"\x01" * 33),
     "^ed25519 public key of 33 bytes; expected 32$"),
    ("ed25519-trailing-byte", lambda k: line_of("ssh-ed25519", ed(k).blob + b"\x00"),
     "^1 trailing bytes after the ssh-ed25519 key$"),
    # ecdsa
    ("ecdsa-wrong-curve", lambda k: p256_with(k, curve=b"nistp384"),
     r"^curve nistp384 does not match the key type \(nistp256\)$"),
    ("ecdsa-compressed-point",
     lambda k: p256_with(k, point=b"\x02" + fields(k["ecdsa256"].blob)[2][1:33]),
     "^ECDSA point is not in uncompressed form$"),
    ("ecdsa-short-point",
     lambda k: p256_with(k, point=fields(k["ecdsa256"].blob)[2][:-1]),
     "^ECDSA point of 64 bytes; nistp256 needs 65$"),
    ("ecdsa-p384-sized-point",
     lambda k: p256_with(k, point=fields(k["ecdsa384"].blob)[2]),
     "^ECDSA point of 97 bytes; nistp256 needs 65$"),
    ("ecdsa-off-curve",
     lambda k: p256_with(k, point=flip_last_byte(fields(k["ecdsa256"].blob)[2])),
     "^ECDSA point is not on the nistp256 curve$"),
    ("ecdsa-coordinate-not-reduced",
     lambda k: p256_with(k, point=p256_point_bytes(p256_point_with_small_x()[0] + P256,
                                                   p256_point_with_small_x()[1])),
     "^ECDSA point is not on the nistp256 curve$"),
    ("ecdsa-no-point",
     lambda k: line_of("ecdsa-sha2-nistp256",
                       string("ecdsa-sha2-nistp256") + string("nistp256")),
     r"^truncated key blob \(reading the ECDSA point\)$"),
    # rsa
    ("rsa-1024-generated", lambda k: k["rsa1024"].line,
     "^RSA key of 1024 bits; at least 2048 required$"),
    ("rsa-2047", lambda k: line_of("ssh-rsa", rsa_blob(65537, rsa_modulus(2047))),
     "^RSA key of 2047 bits; at least 2048 required$"),
    ("rsa-16385", lambda k: line_of("ssh-rsa", rsa_blob(65537, rsa_modulus(16385))),
     "^RSA key of 16385 bits; at most 16384 allowed$"),
    ("rsa-even-exponent", lambda k: line_of("ssh-rsa", rsa_blob(65536, rsa_modulus(2048))),
     "^RSA exponent 65536 is not an odd number >= 3$"),
    ("rsa-exponent-1", lambda k: line_of("ssh-rsa", rsa_blob(1, rsa_modulus(2048))),
     "^RSA exponent 1 is not an odd number >= 3$"),
    ("rsa-exponent-0", lambda k: line_of("ssh-rsa", rsa_blob(0, rsa_modulus(2048))),
     "^RSA exponent 0 is not an odd number >= 3$"),
    ("rsa-huge-even-exponent",
     lambda k: line_of("ssh-rsa", rsa_blob(2**100, rsa_modulus(2048))),
     "^RSA exponent of that size is not an odd number >= 3$"),
    ("rsa-negative-modulus",
     lambda k: line_of("ssh-rsa", string("ssh-rsa") + mpint(65537)
                       + string(b"\x80" + b"\x01" * 255)),
     "^negative RSA modulus$"),
    ("rsa-padded-exponent",
     lambda k: line_of("ssh-rsa", string("ssh-rsa") + string(b"\x00\x01\x00\x01")
                       + mpint(rsa_modulus(2048))),
     "^RSA exponent has a superfluous leading zero byte$"),
    ("rsa-zero-as-one-byte",
     lambda k: line_of("ssh-rsa", string("ssh-rsa") + string(b"\x00")
                       + mpint(rsa_modulus(2048))),
     "^RSA exponent has a superfluous leading zero byte$"),
    ("rsa-no-modulus", lambda k: line_of("ssh-rsa", string("ssh-rsa") + mpint(65537)),
     r"^truncated key blob \(reading the RSA modulus\)$"),
    ("rsa-trailing-bytes",
     lambda k: line_of("ssh-rsa", k["rsa2048"].blob + b"\x00\x00"),
     "^2 trailing bytes after the ssh-rsa key$"),
    # security keys
    ("sk-ed25519-empty-application",
     lambda k: line_of("sk-ssh-ed25519@openssh.com",
                       sk_blobs(k, b"")["sk-ssh-ed25519@openssh.com"]),
     "^security key application must be non-empty printable ASCII$"),
    ("sk-ecdsa-control-in-application",
     lambda k: line_of("sk-ecdsa-sha2-nistp256@openssh.com",
                       sk_blobs(k, b"ssh:\n")["sk-ecdsa-sha2-nistp256@openssh.com"]),
     "^security key application must be non-empty printable ASCII$"),
    ("sk-ed25519-non-ascii-application",
     lambda k: line_of("sk-ssh-ed25519@openssh.com",
                       sk_blobs(k, "ssh:é".encode())["sk-ssh-ed25519@openssh.com"]),
     "^security key application must be non-empty printable ASCII$"),
    ("sk-ed25519-no-application",
     lambda k: line_of("sk-ssh-ed25519@openssh.com",
                       sk_blobs(k)["sk-ssh-ed25519@openssh.com"][:-8]),
     r"^truncated key blob \(reading the security key application\)$"),
    ("sk-ecdsa-wrong-curve",
     lambda k: p256_with(k, curve=b"nistp521",
                         key_type="sk-ecdsa-sha2-nistp256@openssh.com"),
     r"^curve nistp521 does not match the key type \(nistp256\)$"),
    ("sk-ed25519-short-key",
     lambda k: line_of("sk-ssh-ed25519@openssh.com", string("sk-ssh-ed25519@openssh.com")
                       + string(b"\x01" * 31) + string("ssh:")),
     "^ed25519 public key of 31 bytes; expected 32$"),
    # characters and sizes
    ("nul", lambda k: ed(k).line + "\x00", "^control character U\\+0000 in line$"),
    ("nul-in-blob", lambda k: f"ssh-ed25519 {ed(k).b64[:10]}\x00{ed(k).b64[10:]}",
     "^control character U\\+0000 in line$"),
    ("cr-injection", lambda k: f"{ed(k).line}\r{k['rsa2048'].line}",
     "^control character U\\+000D in line$"),
    ("lf-inside", lambda k: f"{ed(k).line}\n{k['rsa2048'].line}",
     "^control character U\\+000A in line$"),
    ("trailing-lf", lambda k: ed(k).line + "\n", "^control character U\\+000A in line$"),
    ("vertical-tab-separator", lambda k: f"ssh-ed25519\x0b{ed(k).b64}",
     "^control character U\\+000B in line$"),
    ("form-feed", lambda k: f"{ed(k).line}\x0c", "^control character U\\+000C in line$"),
    ("escape-in-comment", lambda k: f"{ed(k).line} \x1b]0;owned\x07",
     "^control character U\\+001B in line$"),
    ("del-in-comment", lambda k: f"{ed(k).line} a\x7fb", "^control character U\\+007F in line$"),
    ("c1-in-comment", lambda k: f"{ed(k).line} a\x85b", "^control character U\\+0085 in line$"),
    ("csi-c1-in-comment", lambda k: f"{ed(k).line} \x9b31m",
     "^control character U\\+009B in line$"),
    ("unicode-in-comment", lambda k: f"{ed(k).line} café",
     "^non-ASCII character U\\+00E9 in comment$"),
    ("nbsp-in-comment", lambda k: f"{ed(k).line} a\u00a0b",
     "^non-ASCII character U\\+00A0 in comment$"),
    ("line-separator-in-comment", lambda k: f"{ed(k).line} a\u2028b",
     "^non-ASCII character U\\+2028 in comment$"),
    ("unicode-hyphen-in-type", lambda k: f"ssh\u2010ed25519 {ed(k).b64}",
     "^non-ASCII character U\\+2010 in key type$"),
    ("fullwidth-in-blob", lambda k: f"ssh-ed25519 {ed(k).b64[:-1]}\uff1d",
     "^non-ASCII character U\\+FF1D in key blob$"),
    ("long-comment", lambda k: f"{ed(k).line.split(' ')[0]} {ed(k).b64} {'c' * 257}",
     "^comment of 257 characters exceeds the 256-character limit$"),
    ("long-line", lambda k: f"{ed(k).line} {'c' * 16384}",
     "^line of [0-9]+ characters exceeds the 16384-character limit$"),
]


@pytest.mark.parametrize("make, reason",
                         [pytest.param(make, reason, id=name) for name, make, reason in REJECTED])
def test_rejected(keys: dict[str, Key], make: Maker, reason: str) -> None:
    with pytest.raises(KeyRejected, match=reason):
        parse_public_key(make(keys))


@pytest.mark.parametrize("name", ACCEPTED_GENERATED)
def test_trailing_bytes_rejected_for_every_type(keys: dict[str, Key], name: str) -> None:
    k = keys[name]
    with pytest.raises(KeyRejected, match=f"^8 trailing bytes after the {k.key_type} key$"):
        parse_public_key(line_of(k.key_type, k.blob + string("junk")))


@pytest.mark.parametrize("key_type", sorted(t for t in SUPPORTED_TYPES if t.startswith("sk-")))
def test_trailing_bytes_rejected_for_security_keys(keys: dict[str, Key], key_type: str) -> None:
    blob = sk_blobs(keys)[key_type] + b"\x00"
    with pytest.raises(KeyRejected, match=f"^1 trailing bytes after the {key_type} key$"):
        parse_public_key(line_of(key_type, blob))


def test_line_limit_is_exact(keys: dict[str, Key]) -> None:
    base = keys["rsa2048"].line.split(" ")[:2]
    head = " ".join(base) + " "
    # A comment may be at most 256 characters, so reach the limit with whitespace.
    fits = head + "c" + " " * (16384 - len(head) - 2) + "c"
    assert len(fits) == 16384
    assert parse_public_key(fits).comment == "c c"
    with pytest.raises(KeyRejected, match="^line of 16385 characters exceeds"):
        parse_public_key(fits + " ")


# --- parse_key_body ------------------------------------------------------------------

def fake_ed25519_lines(count: int) -> list[str]:
    """Distinct, valid ed25519 lines (any 32 bytes parse; they need not be real keys)."""
    return [ed_with_key(bytes([i]) * 32) + f" k{i}" for i in range(count)]


def test_body_two_keys(keys: dict[str, Key]) -> None:
    body = f"{keys['ed25519'].line}\n{keys['rsa2048'].line}\n".encode()
    found, rejected = parse_key_body(body)
    assert [k.fingerprint for k in found] == [keys["ed25519"].keygen_fingerprint,
                                              keys["rsa2048"].keygen_fingerprint]
    assert rejected == []


def test_body_duplicates_keep_the_first(keys: dict[str, Key]) -> None:
    k = keys["ed25519"]
    body = f"{k.key_type} {k.b64} first\n{k.key_type}\t{k.b64} second\n{k.line}\n".encode()
    found, rejected = parse_key_body(body)
    assert [key.comment for key in found] == ["first"]
    assert rejected == []


def test_body_skips_comments_and_blank_lines(keys: dict[str, Key]) -> None:
    body = (f"# keys for web-1\n\n   \n\t\n  # indented comment\n{keys['ed25519'].line}\n"
            f"#{keys['rsa2048'].line}\n").encode()
    found, rejected = parse_key_body(body)
    assert [k.key_type for k in found] == ["ssh-ed25519"]
    assert rejected == []


def test_body_crlf_line_endings(keys: dict[str, Key]) -> None:
    body = f"# c\r\n\r\n{keys['ed25519'].line}\r\n{keys['ecdsa256'].line}\r\n".encode()
    found, rejected = parse_key_body(body)
    assert [k.comment for k in found] == ["ed25519@test", "ecdsa256@test"]
    assert rejected == []


@pytest.mark.parametrize("text, line_no", [
    ("{good}\r\r\n", 1),               # only one trailing CR is a line ending
    ("{good}\r{good}\n", 1),           # CR inside a line
    ("# x\n{good}\r \n", 2),           # CR not at the very end
])
def test_body_other_carriage_returns_reject_the_line(keys: dict[str, Key], text: str,
                                                     line_no: int) -> None:
    found, rejected = parse_key_body(text.format(good=keys["ed25519"].line).encode())
    assert found == []
    assert rejected == [f"line {line_no}: control character U+000D in line"]


def test_body_bad_line_among_good_ones(keys: dict[str, Key]) -> None:
    body = (f"{keys['ed25519'].line}\nssh-rsa {keys['ed25519'].b64}\n"
            f"{keys['ecdsa384'].line}\n").encode()
    found, rejected = parse_key_body(body)
    assert [k.key_type for k in found] == ["ssh-ed25519", "ecdsa-sha2-nistp384"]
    assert rejected == ["line 2: type mismatch: line says ssh-rsa, key blob says ssh-ed25519"]


def test_body_line_numbers_count_comments_and_blanks(keys: dict[str, Key]) -> None:
    body = f"# header\n\n{keys['rsa1024'].line}\nnot a key\n".encode()
    found, rejected = parse_key_body(body)
    assert found == []
    assert rejected == ["line 3: RSA key of 1024 bits; at least 2048 required",
                        "line 4: unsupported key type 'not'"]


def test_body_unicode_rejects_only_its_line(keys: dict[str, Key]) -> None:
    body = f"{keys['ed25519'].line} José\n{keys['rsa2048'].line}\n".encode()
    found, rejected = parse_key_body(body)
    assert [k.key_type for k in found] == ["ssh-rsa"]
    assert rejected == ["line 1: non-ASCII character U+00E9 in comment"]


def test_body_empty() -> None:
    assert parse_key_body(b"") == ([], [])
    assert parse_key_body(b"\n\n# nothing\n") == ([], [])


def test_body_10_mib_rejected_by_size_cap(keys: dict[str, Key]) -> None:
    body = (keys["ed25519"].line + "\n").encode() * (10 * 1024 * 1024 // 100)
    body += b"#" * (10 * 1024 * 1024 - len(body))
    assert len(body) == 10 * 1024 * 1024
    with pytest.raises(KeyRejected,
                       match="^body of 10485760 bytes exceeds the 65536-byte limit$"):
        parse_key_body(body)


def test_body_size_cap_is_inclusive(keys: dict[str, Key]) -> None:
    line = (keys["ed25519"].line + "\n").encode()
    body = line + b"#" * (65536 - len(line))
    assert len(parse_key_body(body)[0]) == 1
    with pytest.raises(KeyRejected, match="^body of 65537 bytes exceeds the 65536-byte limit$"):
        parse_key_body(body + b"\n")


def test_body_custom_size_cap(keys: dict[str, Key]) -> None:
    body = keys["rsa2048"].line.encode()
    with pytest.raises(KeyRejected, match=f"^body of {len(body)} bytes exceeds the 100-byte"):
        parse_key_body(body, max_bytes=100)


def test_body_32_keys_accepted() -> None:
    body = "\n".join(fake_ed25519_lines(32)).encode()
    found, rejected = parse_key_body(body)
    assert len(found) == 32
    assert len({k.fingerprint for k in found}) == 32
    assert rejected == []


def test_body_33_keys_rejected() -> None:
    body = "\n".join(fake_ed25519_lines(33)).encode()
    with pytest.raises(KeyRejected, match="^33 keys; at most 32 per target$"):
        parse_key_body(body)


def test_body_invalid_lines_count_towards_the_limit() -> None:
    body = "\n".join(fake_ed25519_lines(30) + ["junk"] * 3).encode()
    with pytest.raises(KeyRejected, match="^33 keys; at most 32 per target$"):
        parse_key_body(body)


def test_body_comments_do_not_count_towards_the_limit() -> None:
    body = "\n".join(fake_ed25519_lines(32) + ["# comment", "", "   "] * 20).encode()
    assert len(parse_key_body(body)[0]) == 32


def test_body_custom_key_limit() -> None:
    body = "\n".join(fake_ed25519_lines(3)).encode()
    with pytest.raises(KeyRejected, match="^3 keys; at most 2 per target$"):
        parse_key_body(body, max_keys=2)


@pytest.mark.parametrize("body", [b"\xff\xfe", b"ssh-ed25519 AAAA \xc3\x28\n",
                                  b"\xed\xa0\x80"])  # bad byte, bad sequence, surrogate
def test_body_invalid_utf8(body: bytes) -> None:
    with pytest.raises(KeyRejected, match=r"^body is not valid UTF-8 \(byte offset \d+\)$"):
        parse_key_body(body)


@pytest.mark.parametrize("body", [b"\x00", b"# comment with \x00 inside\n",
                                  b"ssh-ed25519 AAAA\x00\n"])
def test_body_nul_rejects_everything(keys: dict[str, Key], body: bytes) -> None:
    with pytest.raises(KeyRejected, match="^NUL byte at offset"):
        parse_key_body((keys["ed25519"].line + "\n").encode() + body)


# --- parse_authorized_keys_line ------------------------------------------------------

ALLOWED_FLAGS = ["restrict", "port-forwarding", "no-port-forwarding", "no-agent-forwarding",
                 "no-X11-forwarding", "no-pty", "no-user-rc", "no-touch-required",
                 "verify-required"]


def test_authorized_line_without_options(keys: dict[str, Key]) -> None:
    k = keys["ecdsa521"]
    assert parse_authorized_keys_line(k.line) == ((), parse_public_key(k.line))
    assert parse_authorized_keys_line("  " + k.line + "\t")[0] == ()


@pytest.mark.parametrize("flag", ALLOWED_FLAGS)
def test_authorized_allowed_flags(keys: dict[str, Key], flag: str) -> None:
    k = keys["ed25519"]
    options, key = parse_authorized_keys_line(f"{flag} {k.line}")
    assert options == (flag.lower(),)
    assert key == parse_public_key(k.line)


@pytest.mark.parametrize("option", [
    'permitopen="db-1:22"',
    'permitopen="db-1:*"',
    'permitopen="db_1.internal.example:65535"',
    'permitopen="10.0.0.5:5432"',
    'permitopen="[2001:db8::1]:22"',
    'permitopen="[::1]:*"',
    'permitopen="localhost:1"',
    'from="10.0.0.0/8"',
    'from="*.example.com,!bad.example.com"',
    'from="10.0.0.1, 10.0.0.2"',
    'expiry-time="20300101"',
    'expiry-time="203001011230"',
    'expiry-time="20300101123059"',
    'expiry-time="20300101123059Z"',
    'expiry-time="20300101Z"',
])
def test_authorized_allowed_valued_options(keys: dict[str, Key], option: str) -> None:
    options, key = parse_authorized_keys_line(f"{option} {keys['rsa2048'].line}")
    assert options == (option,)
    assert key.key_type == "ssh-rsa"


def test_authorized_options_keep_order_and_lowercase_names(keys: dict[str, Key]) -> None:
    line = (f'RESTRICT,PermitOpen="DB-1:22",From="10.0.0.0/8",No-Pty,'
            f'permitopen="db-2:*" {keys["ed25519"].line}')
    options, key = parse_authorized_keys_line(line)
    assert options == ("restrict", 'permitopen="DB-1:22"', 'from="10.0.0.0/8"', "no-pty",
                       'permitopen="db-2:*"')
    assert key.comment == "ed25519@test"


def test_authorized_quoted_commas_and_spaces_do_not_end_options(keys: dict[str, Key]) -> None:
    line = f'from="10.0.0.1, 10.0.0.2 ,10.0.0.3",no-pty {keys["ed25519"].line}'
    assert parse_authorized_keys_line(line)[0] == ('from="10.0.0.1, 10.0.0.2 ,10.0.0.3"',
                                                   "no-pty")


def test_authorized_options_end_at_a_tab(keys: dict[str, Key]) -> None:
    k = keys["ed25519"]
    options, key = parse_authorized_keys_line(f'no-pty,from="10.0.0.1"\t{k.line}')
    assert options == ("no-pty", 'from="10.0.0.1"')
    assert key == parse_public_key(k.line)


def test_authorized_escaped_quote_inside_value(keys: dict[str, Key]) -> None:
    # The escaped quotes, comma and spaces all stay inside the command value, so the
    # options are split correctly and the forbidden option is what gets reported.
    line = f'no-pty,command="echo \\"a b, c\\"",no-user-rc {keys["ed25519"].line}'
    with pytest.raises(KeyRejected, match="^option 'command' grants more than tunnels$"):
        parse_authorized_keys_line(line)


def test_authorized_escaped_quote_is_dequoted_before_checking(keys: dict[str, Key]) -> None:
    with pytest.raises(KeyRejected, match="^option 'from' value .* contains a quote"):
        parse_authorized_keys_line(f'from="10.0.0.1\\"x" {keys["ed25519"].line}')


@pytest.mark.parametrize("prefix", [
    'from="10.0.0.1',
    'from="10.0.0.1\\"',
    'no-pty,permitopen="db-1:22',
    'command="ls',
])
def test_authorized_unbalanced_quotes(keys: dict[str, Key], prefix: str) -> None:
    with pytest.raises(KeyRejected, match="^unbalanced quotes in the value of option"):
        parse_authorized_keys_line(f"{prefix} {keys['ed25519'].line}")


@pytest.mark.parametrize("option, name", [
    ('command="/bin/sh"', "command"),
    ('COMMAND="ls"', "COMMAND"),
    ("command", "command"),
    ('permitlisten="8080"', "permitlisten"),
    ('permitlisten="localhost:8080"', "permitlisten"),
    ("agent-forwarding", "agent-forwarding"),
    ("pty", "pty"),
    ("X11-forwarding", "X11-forwarding"),
    ("x11-forwarding", "x11-forwarding"),
    ("user-rc", "user-rc"),
    ('tunnel="0"', "tunnel"),
    ('environment="LD_PRELOAD=/tmp/x.so"', "environment"),
    ("cert-authority", "cert-authority"),
    ('principals="root"', "principals"),
    ('restrict,pty', "pty"),
    ('permitopen="db-1:22",Agent-Forwarding', "Agent-Forwarding"),
])
def test_authorized_forbidden_options(keys: dict[str, Key], option: str, name: str) -> None:
    with pytest.raises(KeyRejected, match=f"^option '{name}' grants more than tunnels$"):
        parse_authorized_keys_line(f"{option} {keys['ed25519'].line}")


@pytest.mark.parametrize("option, reason", [
    ("xyz", "^unknown option 'xyz'$"),
    ('xyz="1"', "^unknown option 'xyz'$"),
    ("no-restrict", "^unknown option 'no-restrict'$"),
    ("permit-open", "^unknown option 'permit-open'$"),
    ("restrict,foo_bar", "^unknown option 'foo_bar'$"),
    ("caf\u00e9", "^unknown option 'caf\u00e9'$"),
    ('no-pty="yes"', "^option 'no-pty' takes no value$"),
    ('restrict=""', "^option 'restrict' takes no value$"),
    ("from", "^option 'from' needs a value in double quotes$"),
    ("permitopen=db-1:22", "^option 'permitopen' needs a value in double quotes$"),
    (",restrict", "^malformed options: expected an option name at column 1$"),
    ("restrict,,no-pty", "^malformed options: expected an option name at column 10$"),
    ("restrict,", "^malformed options: expected an option name at column 10$"),
    ('from="10.0.0.1"x', "^malformed options: unexpected 'x' after option 'from'$"),
    ('"restrict"', "^malformed options: expected an option name at column 1$"),
    ('from=""', "^option 'from' has an empty pattern list$"),
    ('from="10.0.0.1\t10.0.0.2"', "^option 'from' value .* contains a quote or control"),
    ('from="caf\u00e9.example"', "^non-ASCII character U\\+00E9 in option 'from'$"),
    ('permitopen="*:*"', "the host may not be '\\*'"),
    ('permitopen="*:22"', "the host may not be '\\*'"),
    ('permitopen="db-*:22"', "is not a host name or address$"),
    ('permitopen=":22"', "is not a host name or address$"),
    ('permitopen="db 1:22"', "is not a host name or address$"),
    ('permitopen="-db:22"', "is not a host name or address$"),
    ('permitopen="db-1"', "expected host:port$"),
    ('permitopen="db-1:"', "port '' is not"),
    ('permitopen="db-1:0"', "port '0' is not '\\*' or 1-65535$"),
    ('permitopen="db-1:65536"', "port '65536' is not"),
    ('permitopen="db-1:ssh"', "port 'ssh' is not"),
    ('permitopen="db-1:22:33"', "expected host:port \\(an IPv6 host goes in \\[brackets\\]\\)$"),
    ('permitopen="999.1.1.1:22"', "is not an IPv4 address$"),
    ('permitopen="2001:db8::1:22"', "an IPv6 host goes in \\[brackets\\]"),
    ('permitopen="[fe80::1%eth0]:22"', "is not an IPv6 address$"),
    ('permitopen="[2001:db8::zz]:22"', "is not an IPv6 address$"),
    ('permitopen="[::1]22"', "is not an IPv6 address$"),
    ('permitopen="[::1]"', "is not an IPv6 address$"),
    ('expiry-time="2030"', "^expiry-time '2030' is not YYYYMMDD\\[HHMM\\[SS\\]\\]\\[Z\\]$"),
    ('expiry-time="20301301"', "^expiry-time '20301301' is not"),
    ('expiry-time="20300230"', "^expiry-time '20300230' is not"),
    ('expiry-time="203001012460"', "^expiry-time '203001012460' is not"),
    ('expiry-time="2030010112"', "^expiry-time '2030010112' is not"),
    ('expiry-time="20300101ZZ"', "^expiry-time '20300101ZZ' is not"),
    ('expiry-time="2030-01-01"', "^expiry-time '2030-01-01' is not"),
])
def test_authorized_bad_options(keys: dict[str, Key], option: str, reason: str) -> None:
    with pytest.raises(KeyRejected, match=reason):
        parse_authorized_keys_line(f"{option} {keys['ed25519'].line}")


@pytest.mark.parametrize("line, reason", [
    ("restrict", "^no key after the options$"),
    ("restrict \t ", "^no key after the options$"),
    ("restrict no-pty {key}", "^options are not allowed before the key type$"),
    ("restrict ssh-ed25519 AAAA", r"^truncated key blob"),
    ("restrict ssh-rsa {ed_b64}", "^type mismatch: line says ssh-rsa"),
    ("ssh-dss AAAAB3NzaC1kc3M=", "^unsupported key type 'ssh-dss'$"),
    ("ssh-ed25519-cert-v01@openssh.com AAAA", "^certificate key type"),
    ('from="10.0.0.1" {key}\rssh-rsa AAAA', "^control character U\\+000D in line$"),
    ('from="10.0.0.1\x01" {key}', "^control character U\\+0001 in line$"),
    ('from="{long}" {key}', "^line of [0-9]+ characters exceeds the 16384-character limit$"),
    ("", "^empty line$"),
])
def test_authorized_bad_lines(keys: dict[str, Key], line: str, reason: str) -> None:
    k = keys["ed25519"]
    text = line.format(key=k.line, ed_b64=k.b64, long="1" * 16384)
    with pytest.raises(KeyRejected, match=reason):
        parse_authorized_keys_line(text)
