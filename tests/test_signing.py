"""Ed25519 key files and canonical-JSON signatures."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from fedarches.errors import CanonicalJSONError, KeyFileError, SignatureError
from fedarches.format.signing import generate_key, keygen, load_private_key, load_public_key, load_site_key, sign_canonical, verify_canonical


def test_keygen_writes_private_0600_and_public_key(tmp_path):
    k = keygen(tmp_path / "key")
    assert stat.S_IMODE(k.private.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o700
    pub = load_public_key(k.public)
    priv = load_site_key(tmp_path / "key")
    assert priv.public == pub
    assert k.key_id == pub.key_id == hashlib.sha256(pub.raw).hexdigest()
    assert b"PRIVATE" not in k.public.read_bytes()


def test_keygen_refuses_to_overwrite(tmp_path):
    keygen(tmp_path / "key")
    before = (tmp_path / "key" / "site.key").read_bytes()
    with pytest.raises(KeyFileError, match="^key file check failed.*already exists"):
        keygen(tmp_path / "key")
    assert (tmp_path / "key" / "site.key").read_bytes() == before


def test_group_readable_private_key_is_refused(tmp_path):
    k = keygen(tmp_path / "key")
    os.chmod(k.private, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_private_key(k.private)


def test_canonical_signature_roundtrip_and_tampering():
    key = generate_key()
    data, sig = sign_canonical(key, {"b": [1, 2], "a": "ü"})
    assert data == '{"a":"ü","b":[1,2]}'.encode()
    verify_canonical(key.public, data, sig)
    with pytest.raises(SignatureError, match="^signature check failed"):
        verify_canonical(key.public, data.replace(b"1", b"3"), sig)
    with pytest.raises(SignatureError, match="^signature check failed"):
        verify_canonical(generate_key().public, data, sig)
    spaced = b'{"a": 1}'
    with pytest.raises(CanonicalJSONError, match="^canonical JSON check failed"):
        verify_canonical(key.public, spaced, key.sign(spaced))
