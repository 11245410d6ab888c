"""``fedpersona certs``: a CA, the SuperLink's TLS certificate and one EC key pair per SuperNode.

Everything is made with the ``cryptography`` package (pinned in
``pyproject.toml``); no ``openssl`` binary is needed. The layout follows
Flower's own compose files (``framework/docker/complete/with-tls.yml``), so the
same folder serves ``fedpersona serve``, ``fedpersona edge`` and the compose
file in ``docker/``::

    OUT/ca.crt                  the CA certificate: every SuperNode and `flwr` client trusts it
    OUT/ca.key                  the CA's private key (0600): keep it offline once the certificates exist
    OUT/server.pem              the SuperLink's certificate, with a SAN for every host and IP given
    OUT/server.key              its private key (0600)
    OUT/supernodes/node-N.key   SuperNode N's authentication key, OpenSSH EC P-384 private key (0600)
    OUT/supernodes/node-N.pub   its public key, OpenSSH format: what `flwr supernode register` takes

A SuperNode key is not a TLS client certificate: Flower's node authentication
signs each Fleet request with it, and the SuperLink accepts only nodes whose
public key was registered.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
NODE_DIR = "supernodes"
VALID_DAYS = 365


def _in_root(name: str) -> property:
    return property(lambda self: self.root / name, doc=f"``ROOT/{name}``")


@dataclass(frozen=True)
class CertPaths:
    """Where one ``certs`` folder keeps each file."""

    root: Path

    ca = _in_root("ca.crt")
    ca_key = _in_root("ca.key")
    server_cert = _in_root("server.pem")
    server_key = _in_root("server.key")
    node_dir = _in_root(NODE_DIR)

    def node_keys(self) -> list[Path]:
        """Every SuperNode public key in the folder, in name order."""
        return sorted(self.node_dir.glob("*.pub"))


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the start (never world-readable, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _hosts(hosts: tuple[str, ...] | list[str]) -> list[str]:
    out: list[str] = []
    for host in (*DEFAULT_HOSTS, *hosts):
        host = host.strip()
        if not host or any(c.isspace() for c in host) or "/" in host:
            raise ValueError(f"not a host name or IP address: {host!r}")
        if host not in out:
            out.append(host)
    return out


def _certificate(subject: x509.Name, issuer: x509.Name, public_key, signer, *, ca: bool, sans: list[str] = ()) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = (
            builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in sans]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
            .add_extension(
                x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, content_commitment=False,
                              key_encipherment=False, data_encipherment=False, key_agreement=True,
                              encipher_only=False, decipher_only=False), critical=True)
        )
    return builder.sign(signer, hashes.SHA384())


def write_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """One SuperNode authentication key pair (EC P-384, OpenSSH format): (private, public)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = Path(folder) / f"{name}.key", Path(folder) / f"{name}.pub"
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def make_certs(out: Path, hosts: tuple[str, ...] | list[str] = (), nodes: int = 3, *, force: bool = False) -> CertPaths:
    """Write a CA, the SuperLink's certificate (SANs: 127.0.0.1, localhost and ``hosts``) and ``nodes`` node key pairs.

    Refuses to overwrite an existing CA unless ``force``: a new CA would lock
    out every SuperNode that trusts the old one.
    """
    if nodes < 0:
        raise ValueError("--nodes must be >= 0")
    paths = CertPaths(Path(out))
    if paths.ca.exists() and not force:
        raise FileExistsError(f"{paths.ca} exists; pass --force to replace the CA (every SuperNode must then get the new ca.crt)")
    names = _hosts(hosts)
    paths.root.mkdir(parents=True, exist_ok=True)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpersona"), x509.NameAttribute(NameOID.COMMON_NAME, "fedpersona CA")])
    ca_cert = _certificate(ca_name, ca_name, ca_key.public_key(), ca_key, ca=True)
    _write_private(paths.ca_key, _pem_key(ca_key))
    paths.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpersona"), x509.NameAttribute(NameOID.COMMON_NAME, names[-1] if hosts else "superlink")])
    server_cert = _certificate(server_name, ca_name, server_key.public_key(), ca_key, ca=False, sans=names)
    _write_private(paths.server_key, _pem_key(server_key))
    paths.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))

    for n in range(nodes):
        write_node_key(paths.node_dir, f"node-{n}")
    return paths
