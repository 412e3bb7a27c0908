"""Certificates and keys for the dev cluster, made with ``cryptography``.

One self-signed CA signs the kube-apiserver serving certificate (for 127.0.0.1
and localhost) and a client certificate per identity: the admin (group
system:masters), kube-controller-manager and kube-scheduler (the users that the
default RBAC bindings name), kwok, and the front proxy that the aggregation
layer uses to call extension API servers. A separate RSA key pair signs service
account tokens. Files are written once and reused, so a restarted cluster keeps
its identity and existing kubeconfigs stay valid.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=3650)

# file stem -> (common name, organization or None)
CLIENTS: dict[str, tuple[str, str | None]] = {
    "admin": ("tailor-admin", "system:masters"),
    "kube-controller-manager": ("system:kube-controller-manager", None),
    "kube-scheduler": ("system:kube-scheduler", None),
    "kwok": ("kwok", "system:masters"),
    # bound to the ClusterRole of cluster.STORAGE_RBAC: volumes, claims, classes, events
    "hostpath-provisioner": ("tailor:hostpath-provisioner", None),
    "front-proxy-client": ("front-proxy-client", None),
}


@dataclass(frozen=True)
class Pki:
    """Paths of the files in a PKI directory."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"

    def cert(self, stem: str) -> Path:
        return self.dir / f"{stem}.crt"

    def key(self, stem: str) -> Path:
        return self.dir / f"{stem}.key"


def ensure_pki(directory: Path) -> Pki:
    """Create whatever is missing of the CA, certificates and service-account keys."""
    pki = Pki(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not (pki.ca_cert.exists() and pki.ca_key.exists()):
        key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tailor-devcluster-ca")])
        cert = (
            _builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        _write(pki.ca_key, _key_pem(key))
        _write(pki.ca_cert, cert.public_bytes(serialization.Encoding.PEM))
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)

    if not pki.cert("kube-apiserver").exists():
        san = x509.SubjectAlternativeName(
            [
                x509.DNSName("localhost"),
                x509.DNSName("kubernetes"),
                x509.DNSName("kubernetes.default"),
                x509.DNSName("kubernetes.default.svc"),
                x509.DNSName("kubernetes.default.svc.cluster.local"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("10.96.0.1")),
            ]
        )
        _issue(
            pki,
            "kube-apiserver",
            "kube-apiserver",
            None,
            ca_cert,
            ca_key,
            ExtendedKeyUsageOID.SERVER_AUTH,
            san,
        )
    for stem, (common_name, organization) in CLIENTS.items():
        if not pki.cert(stem).exists():
            _issue(
                pki,
                stem,
                common_name,
                organization,
                ca_cert,
                ca_key,
                ExtendedKeyUsageOID.CLIENT_AUTH,
                None,
            )

    if not pki.sa_key.exists():
        sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write(
            pki.sa_pub,
            sa.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
        _write(pki.sa_key, _key_pem(sa))
    return pki


def _issue(
    pki: Pki,
    stem: str,
    common_name: str,
    organization: str | None,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    usage: x509.ObjectIdentifier,
    san: x509.SubjectAlternativeName | None,
) -> None:
    key = _new_key()
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    builder = (
        _builder(x509.Name(attributes), ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write(pki.key(stem), _key_pem(key))
    _write(pki.cert(stem), cert.public_bytes(serialization.Encoding.PEM))


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)
