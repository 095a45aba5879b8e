"""Key material for a Flower deployment, made with the ``cryptography`` package.

Two kinds of keys, both unrelated to the atlas signing keys (``signing.py``):

- TLS: a private certificate authority and a server certificate for the SuperLink
  (subject alternative names for the loopback address and ``localhost`` by default;
  pass the SuperLink's real host names/addresses for a real deployment). SuperNodes
  and the ``flwr`` CLI get only ``ca.crt``.
- SuperNode authentication: one EC P-384 key pair per SuperNode, private key in
  OpenSSH format (``flower-supernode --auth-supernode-private-key``), public key in
  OpenSSH format (``flwr supernode register``).

Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedarches.atomic import PRIVATE_DIR, PUBLIC_FILE, make_dirs, write_bytes

DEFAULT_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class TLSFiles:
    """Paths of the files `make_tls_certificates` writes."""

    ca_cert: Path  # ca.crt: give this to SuperNodes and the flwr CLI
    ca_key: Path  # ca.key: keep offline
    server_cert: Path  # server.pem: SuperLink --ssl-certfile
    server_key: Path  # server.key: SuperLink --ssl-keyfile


@dataclass(frozen=True)
class SuperNodeKeyFiles:
    """Paths of one SuperNode's authentication key pair."""

    private_key: Path  # OpenSSH private key: flower-supernode --auth-supernode-private-key
    public_key: Path  # OpenSSH public key: flwr supernode register PUBLIC_KEY


def _write_private(path: Path, data: bytes) -> None:
    make_dirs(path.parent, PRIVATE_DIR)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    write_bytes(path, data, mode=PUBLIC_FILE)


def _san_entries(hosts: tuple[str, ...] | list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_tls_certificates(
    out_dir: str | Path,
    hosts: tuple[str, ...] | list[str] = DEFAULT_HOSTS,
    days: int = 365,
    common_name: str = "fedarches SuperLink",
) -> TLSFiles:
    """Write a CA (ca.crt, ca.key) and a SuperLink server certificate signed by it
    (server.pem, server.key) into ``out_dir``. ``hosts`` become the certificate's
    subject alternative names: IP addresses as IP entries, anything else as DNS names.
    """
    if not hosts:
        raise ValueError("make_tls_certificates: give at least one host name or address")
    out = Path(out_dir)
    make_dirs(out, PRIVATE_DIR)
    now = _dt.datetime.now(_dt.timezone.utc)
    not_before = now - _dt.timedelta(minutes=5)
    not_after = now + _dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedarches federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(_san_entries(tuple(hosts))), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )

    files = TLSFiles(
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        server_cert=out / "server.pem",
        server_key=out / "server.key",
    )
    pkcs8 = dict(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    _write_private(files.ca_key, ca_key.private_bytes(**pkcs8))
    _write_public(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, server_key.private_bytes(**pkcs8))
    _write_public(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    return files


def make_supernode_keys(out_dir: str | Path, name: str) -> SuperNodeKeyFiles:
    """Write an EC P-384 key pair for SuperNode authentication: ``<name>`` (OpenSSH
    private key, 0600) and ``<name>.pub`` (OpenSSH public key) in ``out_dir``."""
    out = Path(out_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    files = SuperNodeKeyFiles(private_key=out / name, public_key=out / f"{name}.pub")
    _write_private(
        files.private_key,
        key.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.OpenSSH,
            encryption_algorithm=serialization.NoEncryption(),
        ),
    )
    public = key.public_key().public_bytes(
        encoding=serialization.Encoding.OpenSSH, format=serialization.PublicFormat.OpenSSH
    )
    _write_public(files.public_key, public + f" fedarches-supernode-{name}\n".encode())
    return files


def main(argv: list[str] | None = None) -> int:
    """``python -m fedarches.federation.certs OUT_DIR [--host H ...] [--supernode NAME ...]``:
    write TLS certificates and SuperNode key pairs (used by examples/flower-deployment)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m fedarches.federation.certs",
        description="Write a CA + SuperLink TLS certificate and SuperNode authentication keys.",
    )
    parser.add_argument("out_dir", help="directory for ca.crt, server.pem, server.key, ...")
    parser.add_argument(
        "--host",
        action="append",
        default=None,
        help="host name or IP address the SuperLink is reached at (repeatable; "
        f"default: {', '.join(DEFAULT_HOSTS)})",
    )
    parser.add_argument(
        "--supernode",
        action="append",
        default=[],
        metavar="NAME",
        help="also write a SuperNode key pair NAME / NAME.pub (repeatable)",
    )
    parser.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    args = parser.parse_args(argv)
    hosts = tuple(args.host) if args.host else DEFAULT_HOSTS
    tls = make_tls_certificates(args.out_dir, hosts=hosts, days=args.days)
    print(f"CA certificate:     {tls.ca_cert}  (give to SuperNodes and the flwr CLI)")
    print(f"CA private key:     {tls.ca_key}  (keep offline)")
    print(f"SuperLink cert/key: {tls.server_cert} {tls.server_key}  (for {', '.join(hosts)})")
    for name in args.supernode:
        keys = make_supernode_keys(Path(args.out_dir) / "supernodes", name)
        print(f"SuperNode {name}: {keys.private_key} (private), {keys.public_key} (register this)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
