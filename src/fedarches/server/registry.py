"""Enrolled sites: ``sites.json``, its integrity code, and the rules for adding or rotating a site's key.

Why a registry file and not TUF delegations: sites do not publish anything
that other sites download; the coordinator only needs to know which key
speaks for which site name when a bundle arrives.

Why an HMAC over ``sites.json``: the registry decides whose bundles are
accepted, yet it lives outside the signed repository. Its code is keyed with
``keys/registry.key`` (0600 in the 0700 ``keys/``), so someone who can write
the atlas directory but not read the keys cannot enrol a key by editing the
file. The key's existence is what makes the code mandatory: an atlas made
before the code existed is read as it is and gets the code on its next write,
but once the key exists a ``sites.json`` without a valid code is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from fedarches.atomic import PRIVATE_DIR, PRIVATE_FILE, make_dirs, write_bytes
from fedarches.errors import AtlasDirError, EnrollmentError
from fedarches.format.canonical import canonical_json
from fedarches.format.names import check_name
from fedarches.format.signing import PublicKey, load_public_key, public_key_from_pem, read_key_file
from fedarches.format.version import REFERENCE_SITE, KeyChange
from fedarches.server.repository import utc_timestamp

SITES_FORMAT = "fedarches.sites/1"
REGISTRY_KEY_FILE = "registry.key"
MAX_REGISTRY_BYTES = 16 * 1024 * 1024
_REGISTRY_KEY_BYTES = 32


class RetiredKey(BaseModel):
    """A key a site used before ``enroll --replace``: bundles it signs are no longer accepted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: str
    enrolled: str
    replaced: str


class EnrolledSite(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str
    key_id: str
    public_key: str  # PEM
    enrolled: str
    previous_keys: tuple[RetiredKey, ...] = ()

    def key(self) -> PublicKey:
        return public_key_from_pem(self.public_key.encode("ascii"), source=f"key of {self.site}")


class SiteRegistry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = SITES_FORMAT
    sites: dict[str, EnrolledSite] = {}
    mac: str | None = None  # HMAC-SHA256 of the registry without this field (module docstring)


def registry_key_path(sites_json: Path) -> Path:
    """``keys/registry.key`` of the atlas directory that holds ``sites_json``."""
    return sites_json.parent / "keys" / REGISTRY_KEY_FILE


def _mac(secret: bytes, registry: SiteRegistry) -> str:
    body = canonical_json(registry.model_dump(mode="json", exclude={"mac"}))
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def _read_secret(sites_json: Path) -> bytes | None:
    path = registry_key_path(sites_json)
    if not path.exists():
        return None
    data, mode = read_key_file(path, "registry key")
    if mode & 0o077 or len(data) != _REGISTRY_KEY_BYTES:
        raise AtlasDirError(
            f"atlas directory check failed: {path} must be {_REGISTRY_KEY_BYTES} bytes with mode 600 "
            f"(it is {len(data)} bytes, mode {mode:o})"
        )
    return data


def _secret_for_write(sites_json: Path) -> bytes:
    secret = _read_secret(sites_json)
    if secret is None:
        secret = secrets.token_bytes(_REGISTRY_KEY_BYTES)
        keys = registry_key_path(sites_json).parent
        make_dirs(keys, PRIVATE_DIR)
        write_bytes(keys / REGISTRY_KEY_FILE, secret, mode=PRIVATE_FILE)
    return secret


def _check_mac(path: Path, registry: SiteRegistry) -> None:
    secret = _read_secret(path)
    if secret is None:
        return  # written before the code existed; protected from its next write on
    if registry.mac is None or not hmac.compare_digest(registry.mac, _mac(secret, registry)):
        state = "has no integrity code" if registry.mac is None else "does not match its integrity code"
        raise EnrollmentError(
            f"enrollment check failed: {path} {state}; it was changed outside `fedarches atlas enroll`, "
            "so its keys are not trusted. Restore it from a backup, or move it away and enroll every site again"
        )


def read_registry(path: Path) -> SiteRegistry:
    """The registry at ``path`` (empty if there is none), refused if changed by hand."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_REGISTRY_BYTES + 1)
    except FileNotFoundError:
        return SiteRegistry()
    except IsADirectoryError:
        raise AtlasDirError(f"atlas directory check failed: {path} is a directory, not the site registry") from None
    if len(data) > MAX_REGISTRY_BYTES:
        raise AtlasDirError(f"atlas directory check failed: {path} is larger than {MAX_REGISTRY_BYTES} bytes")
    try:
        registry = SiteRegistry.model_validate_json(data)
    except ValidationError as exc:
        raise AtlasDirError(f"atlas directory check failed: {path} is invalid: {exc.errors()[0]['msg']}") from exc
    _check_mac(path, registry)
    return registry


def write_registry(path: Path, registry: SiteRegistry) -> None:
    """Write ``registry`` with its integrity code (creating ``keys/registry.key`` on first use)."""
    sealed = registry.model_copy(update={"mac": _mac(_secret_for_write(path), registry)})
    write_bytes(path, canonical_json(sealed), mode=PRIVATE_FILE)


def key_changes(registry: SiteRegistry) -> list[KeyChange]:
    """Every rotation the registry holds, oldest first (what the signed lineage records)."""
    out = []
    for site in registry.sites.values():
        keys = [r.key_id for r in site.previous_keys] + [site.key_id]
        for i, retired in enumerate(site.previous_keys):
            out.append(KeyChange(site=site.site, old_key_id=retired.key_id, new_key_id=keys[i + 1],
                                 replaced=retired.replaced))
    return sorted(out, key=lambda c: (c.replaced, c.site, c.old_key_id))


def as_public_key(public_key: PublicKey | str | os.PathLike[str] | bytes) -> PublicKey:
    if isinstance(public_key, PublicKey):
        return public_key
    if isinstance(public_key, bytes):
        return public_key_from_pem(public_key)
    return load_public_key(public_key)


def check_site_name(site: str, enrolled: Iterable[str] = ()) -> None:
    """The name policy (``format.names``) for a new site: not reserved, not like an ``enrolled`` one.

    Raises ``InvalidNameError``. ``REFERENCE_SITE`` is what the reference
    conditions are recorded under, so no site may read as it.
    """
    check_name(site, kind="site", existing=enrolled, reserved=(REFERENCE_SITE,))


def _retire(old: EnrolledSite, now: str) -> tuple[RetiredKey, ...]:
    return (*old.previous_keys, RetiredKey(key_id=old.key_id, enrolled=old.enrolled, replaced=now))


def _check_key_unused(reg: SiteRegistry, site: str, key: PublicKey) -> None:
    """One key, one identity, once: refuse a key enrolled for another site or retired by any site."""
    for other in reg.sites.values():
        if other.key_id == key.key_id and other.site != site:
            raise EnrollmentError(
                f"enrollment check failed: key {key.key_id[:16]}... is already enrolled for site "
                f"{other.site!r}; every site needs its own key (`fedarches site keygen`)"
            )
        for retired in other.previous_keys:
            if retired.key_id == key.key_id:
                raise EnrollmentError(
                    f"enrollment check failed: key {key.key_id[:16]}... was retired by site {other.site!r} on "
                    f"{retired.replaced}; a replaced key is never enrolled again (`fedarches site keygen`)"
                )


def enroll_site(path: Path, site: str, key: PublicKey, *, replace: bool = False) -> EnrolledSite:
    """Add ``site`` with ``key`` to the registry at ``path`` (the caller holds the writer lock).

    The same key again is a no-op; a different key for an enrolled site needs
    ``replace`` (``enroll --replace``), and the old key id is kept in
    ``previous_keys`` with the time it was replaced.
    """
    reg = read_registry(path)
    if site not in reg.sites:  # an enrolled name stays usable (key rotation) whatever rules came later
        check_site_name(site, reg.sites)
    old = reg.sites.get(site)
    if old is not None and old.key_id == key.key_id:
        return old
    if old is not None and not replace:
        raise EnrollmentError(
            f"enrollment check failed: site {site!r} is already enrolled with key {old.key_id[:16]}...; "
            "to rotate its key run `fedarches atlas enroll ATLAS_DIR --site "
            f"{site} --public-key NEW.pub --replace`"
        )
    _check_key_unused(reg, site, key)
    now = utc_timestamp()
    entry = EnrolledSite(
        site=site,
        key_id=key.key_id,
        public_key=key.pem().decode("ascii"),
        enrolled=now,
        previous_keys=_retire(old, now) if old is not None else (),
    )
    reg.sites[site] = entry
    write_registry(path, reg)
    return entry
