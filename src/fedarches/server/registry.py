"""Enrolled sites: ``sites.json`` and the rules for adding a site's key.

Why a registry file and not TUF delegations: sites do not publish anything
that other sites download; the coordinator only needs to know which key
speaks for which site name when a bundle arrives.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from fedarches.atomic import write_bytes
from fedarches.errors import AtlasDirError, EnrollmentError
from fedarches.format.canonical import canonical_json
from fedarches.format.signing import PublicKey, load_public_key, public_key_from_pem
from fedarches.format.version import REFERENCE_SITE
from fedarches.server.repository import utc_timestamp

SITES_FORMAT = "fedarches.sites/1"


class EnrolledSite(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str
    key_id: str
    public_key: str  # PEM
    enrolled: str

    def key(self) -> PublicKey:
        return public_key_from_pem(self.public_key.encode("ascii"), source=f"key of {self.site}")


class SiteRegistry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = SITES_FORMAT
    sites: dict[str, EnrolledSite] = {}


def read_registry(path: Path) -> SiteRegistry:
    try:
        return SiteRegistry.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return SiteRegistry()
    except ValidationError as exc:
        raise AtlasDirError(f"atlas directory check failed: {path} is invalid: {exc.errors()[0]['msg']}") from exc


def write_registry(path: Path, registry: SiteRegistry) -> None:
    write_bytes(path, canonical_json(registry), mode=0o600)


def as_public_key(public_key: PublicKey | str | os.PathLike[str] | bytes) -> PublicKey:
    if isinstance(public_key, PublicKey):
        return public_key
    if isinstance(public_key, bytes):
        return public_key_from_pem(public_key)
    return load_public_key(public_key)


def check_site_name(site: str) -> None:
    if not site or len(site) > 200 or any(ord(c) < 32 for c in site):
        raise EnrollmentError(f"enrollment check failed: site name {site!r} must be 1-200 printable characters")
    if site == REFERENCE_SITE:
        raise EnrollmentError(f"enrollment check failed: {REFERENCE_SITE!r} is reserved for the atlas itself")


def enroll_site(path: Path, site: str, key: PublicKey, *, replace: bool = False) -> EnrolledSite:
    """Add ``site`` with ``key`` to the registry at ``path`` (the caller holds the writer lock).

    One key, one identity: the same key again is a no-op; a different key
    for an enrolled site needs ``replace``; a key enrolled for another site
    is refused.
    """
    check_site_name(site)
    reg = read_registry(path)
    old = reg.sites.get(site)
    if old is not None and old.key_id == key.key_id:
        return old
    if old is not None and not replace:
        raise EnrollmentError(
            f"enrollment check failed: site {site!r} is already enrolled with key {old.key_id[:16]}...; "
            "pass replace=True to rotate its key"
        )
    for other in reg.sites.values():
        if other.key_id == key.key_id and other.site != site:
            raise EnrollmentError(
                f"enrollment check failed: key {key.key_id[:16]}... is already enrolled for site "
                f"{other.site!r}; every site needs its own key (`fedarches site keygen`)"
            )
    entry = EnrolledSite(site=site, key_id=key.key_id, public_key=key.pem().decode("ascii"), enrolled=utc_timestamp())
    reg.sites[site] = entry
    write_registry(path, reg)
    return entry
