"""Pieces of the Flower layer that need no running Flower: certificates, SuperNode
keys, the message records, site settings, and the app configuration."""

from __future__ import annotations

import ipaddress
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedarches.errors import ColumnError, InputDataError, ProtocolError
from fedarches.federation.app_dir import CLIENT_APP, RUN_CONFIG_DEFAULTS, SERVER_APP, write_app_dir
from fedarches.federation.certs import make_supernode_keys, make_tls_certificates
from fedarches.federation.protocol import (
    STATUS_CONTRIBUTED,
    STATUS_FAILED,
    STATUS_NOTHING_NEW,
    MapReply,
    MapRequest,
    SiteConfig,
    site_config_from_context,
    write_sim_sites,
)

ROOT = Path(__file__).resolve().parents[1]


def test_tls_certificates_chain_and_names(tmp_path):
    files = make_tls_certificates(tmp_path / "certs")
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    for key in (files.ca_key, files.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_supernode_keys_are_openssh_p384(tmp_path):
    keys = make_supernode_keys(tmp_path, "site-a")
    private = load_ssh_private_key(keys.private_key.read_bytes(), None)
    public = load_ssh_public_key(keys.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.public_numbers() == private.public_key().public_numbers()
    assert stat.S_IMODE(keys.private_key.stat().st_mode) == 0o600


def test_request_and_reply_records_round_trip():
    req = MapRequest(round=2, atlas_url="http://127.0.0.1:1/", version=3, version_id="ab" * 32,
                     trust_root=b'{"signed": {}}', epochs=4, strategy="conditions")
    assert MapRequest.from_content(req.to_content()) == req

    reply = MapReply(status=STATUS_CONTRIBUTED, site="site a", message="ok", conditions=("s1", "s2"),
                     bundle=b"\x00\x01bytes", metrics={"label_transfer.accuracy_known": 0.9, "epochs": 3})
    back = MapReply.from_content(reply.to_content())
    assert back == reply

    nothing = MapReply(status=STATUS_NOTHING_NEW, site="b")
    assert MapReply.from_content(nothing.to_content()).conditions == ()


def test_failed_reply_carries_site_check_and_class():
    exc = ColumnError("obs column check failed: 'x' is not a column")
    back = MapReply.from_content(MapReply.failed("site-c", exc).to_content())
    assert (back.status, back.site, back.check, back.error_class) == (
        STATUS_FAILED, "site-c", "obs column check", "ColumnError")
    assert back.message == str(exc)


def test_reply_without_bundle_or_with_bad_status_is_refused():
    bad = MapReply(status=STATUS_CONTRIBUTED, site="a").to_content()
    with pytest.raises(ProtocolError, match="no bundle"):
        MapReply.from_content(bad)
    weird = MapReply(status="exploded", site="a").to_content()
    with pytest.raises(ProtocolError, match="status"):
        MapReply.from_content(weird)


def test_site_config_from_node_config_and_simulation_table(tmp_path):
    node = {"site": "h1", "data": "/d/h1.h5ad", "condition-key": "study", "key-dir": "/k/h1"}
    cfg = site_config_from_context(node, {})
    assert cfg.site == "h1" and cfg.data == Path("/d/h1.h5ad") and cfg.results_dir == Path("/k/h1-results")

    sites = [
        SiteConfig(site="a", data=tmp_path / "a.h5ad", condition_key="study", key_dir=tmp_path / "ka"),
        SiteConfig(site="b", data=tmp_path / "b.h5ad", condition_key="batch", key_dir=tmp_path / "kb",
                   conditions_per_round=1, epochs=5),
    ]
    sim = write_sim_sites(tmp_path / "sites.toml", sites)
    got = site_config_from_context({"partition-id": 1, "num-partitions": 2}, {"sim-sites": str(sim)})
    assert got == sites[1]
    with pytest.raises(InputDataError, match="partition-id 2"):
        site_config_from_context({"partition-id": 2, "num-partitions": 3}, {"sim-sites": str(sim)})
    with pytest.raises(InputDataError, match="sim-sites"):
        site_config_from_context({"partition-id": 0, "num-partitions": 2}, {})
    with pytest.raises(InputDataError, match="key-dir"):
        site_config_from_context({"site": "x", "data": "/d", "condition-key": "s"}, {})


def test_project_pyproject_matches_the_app_config(tmp_path):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert project["components"] == {"serverapp": SERVER_APP, "clientapp": CLIENT_APP}
    assert project["config"] == RUN_CONFIG_DEFAULTS

    app = write_app_dir(tmp_path / "fedarches-app")
    from flwr.cli.config_utils import load_and_validate

    config, _warnings = load_and_validate(app / "pyproject.toml")  # imports both components
    assert config["tool"]["flwr"]["app"]["config"] == RUN_CONFIG_DEFAULTS
