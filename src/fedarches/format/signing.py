"""Ed25519 keys for sites and the coordinator, and signatures over canonical JSON.

Why Ed25519: signatures are 64 bytes, keys 32 bytes, verification is fast and
deterministic, and the `cryptography` package implements it without options to
get wrong (no padding, no hash choice). Why canonical JSON: a signature is over
bytes, so the signer and the verifier must turn the same object into the same
bytes; sorted keys, no whitespace and UTF-8 (``format.canonical.canonical_json``) make
that hold across machines and Python versions.

Key files:

- private keys are PEM PKCS#8, unencrypted, written with mode 0600 into a
  directory with mode 0700, and never overwritten (losing a key silently is
  worse than an error);
- public keys are PEM SubjectPublicKeyInfo, safe to mail around;
- a key id is the sha256 of the raw 32-byte public key, so anyone holding the
  public key file can recompute it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel

from fedarches.atomic import PRIVATE_DIR, make_dirs, write_bytes
from fedarches.errors import CanonicalJSONError, KeyFileError, SignatureError
from fedarches.format.canonical import canonical_json

PRIVATE_KEY_FILE = "site.key"
PUBLIC_KEY_FILE = "site.pub"
SIGNATURE_BYTES = 64
# A PEM Ed25519 key is ~120 bytes; anything far larger is not a key file and is
# refused before it is read into memory.
MAX_KEY_FILE_BYTES = 64 * 1024
_PEM_BEGIN = b"-----BEGIN "


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key with a stable id (sha256 of the raw key bytes)."""

    key: Ed25519PublicKey

    @property
    def raw(self) -> bytes:
        return self.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    def pem(self) -> bytes:
        return self.key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def verify(self, data: bytes, signature: bytes, *, what: str = "data") -> None:
        """Raise ``SignatureError`` unless ``signature`` is this key's signature of ``data``."""
        if len(signature) != SIGNATURE_BYTES:
            raise SignatureError(
                f"signature check failed for {what}: the signature is {len(signature)} bytes, "
                f"an Ed25519 signature is {SIGNATURE_BYTES}"
            )
        try:
            self.key.verify(signature, data)
        except InvalidSignature:
            raise SignatureError(
                f"signature check failed for {what}: not signed by key {self.key_id[:16]}... "
                "(the content was changed after signing, or another key signed it)"
            ) from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)


@dataclass(frozen=True)
class PrivateKey:
    """An Ed25519 private key; ``public`` is its public half."""

    key: Ed25519PrivateKey

    @property
    def public(self) -> PublicKey:
        return PublicKey(self.key.public_key())

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)

    def pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def generate_key() -> PrivateKey:
    return PrivateKey(Ed25519PrivateKey.generate())


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` (never widened by umask races), write, fsync.

    ``O_EXCL`` refuses to replace an existing key: regenerating a key by accident
    would orphan every enrollment and every signature made with the old one.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fd = -1
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        if fd >= 0:
            os.close(fd)


def write_private_key(path: str | os.PathLike[str], key: PrivateKey) -> Path:
    """Write ``key`` as PEM with mode 0600; its directory is created 0700."""
    p = Path(path)
    if p.exists():
        raise KeyFileError(
            f"key file check failed: {p} already exists; refusing to overwrite a private key "
            "(move it away first if you really mean to replace it)"
        )
    make_dirs(p.parent, PRIVATE_DIR)
    _write_new_file(p, key.pem(), 0o600)
    return p


def write_public_key(path: str | os.PathLike[str], key: PublicKey) -> Path:
    return write_bytes(path, key.pem(), mode=0o644)


def read_key_file(path: str | os.PathLike[str], what: str) -> tuple[bytes, int]:
    """The bytes and permission bits of a key file, refusing anything but a small regular file.

    Opened non-blocking and checked with ``fstat`` on the open descriptor, so a
    FIFO cannot hang the command and the file checked is the file read; the
    message names what the path really is (missing, a directory, a device).
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise KeyFileError(f"key file check failed: {what} {p} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"key file check failed: {what} {p} cannot be opened ({exc.strerror})") from exc
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise KeyFileError(f"key file check failed: {what} {p} is a directory, not a key file")
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file check failed: {what} {p} is not a regular file")
        if st.st_size > MAX_KEY_FILE_BYTES:
            raise KeyFileError(
                f"key file check failed: {what} {p} is {st.st_size} bytes; a key file is under {MAX_KEY_FILE_BYTES}"
            )
        data = os.read(fd, MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"key file check failed: {what} {p} grew past {MAX_KEY_FILE_BYTES} bytes while read")
    return data, stat.S_IMODE(st.st_mode)


def _check_single_pem(data: bytes, source: str) -> None:
    """Refuse several PEM blocks: the loader would silently take the first and drop the rest."""
    count = data.count(_PEM_BEGIN)
    if count > 1:
        raise KeyFileError(
            f"key file check failed: {source} holds {count} PEM blocks; a key file must hold exactly one key"
        )


def load_private_key(path: str | os.PathLike[str]) -> PrivateKey:
    """Read a PEM Ed25519 private key, refusing files that others can read.

    Like ssh, a private key readable by group or others is treated as possibly
    leaked: the message says how to fix the mode.
    """
    p = Path(path)
    data, mode = read_key_file(p, "private key")
    if mode & 0o077:
        raise KeyFileError(
            f"key file check failed: private key {p} has mode {mode:o}, readable by others; run `chmod 600 {p}`"
        )
    _check_single_pem(data, str(p))
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"key file check failed: {p} is not a PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"key file check failed: {p} is not an Ed25519 key")
    return PrivateKey(key)


def public_key_from_pem(data: bytes, *, source: str = "public key") -> PublicKey:
    _check_single_pem(data, source)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"key file check failed: {source} is not a PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"key file check failed: {source} is not an Ed25519 public key")
    return PublicKey(key)


def load_public_key(path: str | os.PathLike[str]) -> PublicKey:
    data, _mode = read_key_file(path, "public key")
    return public_key_from_pem(data, source=str(path))


def sign_canonical(key: PrivateKey, obj: BaseModel | dict[str, Any]) -> tuple[bytes, bytes]:
    """Return ``(canonical_bytes, signature)`` for ``obj``."""
    data = canonical_json(obj)
    return data, key.sign(data)


def verify_canonical(key: PublicKey, data: bytes, signature: bytes, *, what: str = "data") -> None:
    """Verify ``signature`` over ``data`` and that ``data`` is canonical JSON.

    Requiring canonical bytes (not just a valid signature) means one object has
    exactly one signed encoding, so hashes of signed manifests are identities.
    """
    key.verify(data, signature, what=what)
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CanonicalJSONError(f"canonical JSON check failed for {what}: not JSON ({exc})") from exc
    if canonical_json(obj) != data:
        raise CanonicalJSONError(f"canonical JSON check failed for {what}: bytes are not canonical JSON")


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str, *, what: str = "signature") -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise SignatureError(f"signature check failed: {what} is not base64 ({exc})") from exc


@dataclass(frozen=True)
class SiteKeyPaths:
    """Where ``site keygen`` put the key pair."""

    private: Path
    public: Path
    key_id: str


def keygen(out_dir: str | os.PathLike[str]) -> SiteKeyPaths:
    """Create a site key pair in ``out_dir`` (private 0600, public for enrollment)."""
    d = Path(out_dir)
    priv = d / PRIVATE_KEY_FILE
    if priv.exists():
        raise KeyFileError(
            f"key file check failed: {priv} already exists; this directory already holds a site key "
            "(use it, or choose another --out)"
        )
    key = generate_key()
    make_dirs(d, PRIVATE_DIR)
    write_private_key(priv, key)
    pub = write_public_key(d / PUBLIC_KEY_FILE, key.public)
    return SiteKeyPaths(private=priv, public=pub, key_id=key.public.key_id)


def load_site_key(key_dir: str | os.PathLike[str]) -> PrivateKey:
    """Load the private key that ``keygen`` wrote into ``key_dir``."""
    d = Path(key_dir)
    if d.is_dir():
        return load_private_key(d / PRIVATE_KEY_FILE)
    return load_private_key(d)
