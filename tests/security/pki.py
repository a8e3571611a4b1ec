"""Certificates and tokens made at test time (nothing secret is committed): a CA, a server
certificate for 127.0.0.1/localhost, a client certificate, and a second, untrusted CA."""

from __future__ import annotations

import datetime
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class Authority:
    """A self-signed CA that signs leaf certificates."""

    def __init__(self, name: str):
        self.key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = _pem_cert(self.cert)

    def issue(self, name: str, server: bool) -> tuple[bytes, bytes]:
        """A leaf certificate and its key, as PEM: for 127.0.0.1 and localhost when ``server``."""
        import ipaddress

        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return _pem_cert(builder.sign(self.key, hashes.SHA256())), _pem_key(key)


@dataclass
class Material:
    """Every file a secure server and its clients need, written under ``root``."""

    root: Path
    ca: Path  # the CA that signed both leaves
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path
    tokens: Path
    inference_token: str
    metadata_token: str
    admin_token: str  # every group


def make_material(root: Path) -> Material:
    root.mkdir(parents=True, exist_ok=True)
    ca, rogue = Authority("deepserve-test-ca"), Authority("some-other-ca")

    def write(name: str, data: bytes) -> Path:
        path = root / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    server_cert, server_key = ca.issue("deepserve-gateway", server=True)
    client_cert, client_key = ca.issue("deepserve-client", server=False)
    rogue_cert, rogue_key = rogue.issue("intruder", server=False)
    inference, metadata, admin = (secrets.token_hex(32) for _ in range(3))
    tokens = (
        "# token groups\n"
        f"{inference}  inference\n"
        f"{metadata}   metadata\n"
        f"{admin}      inference,metadata,models   # operators\n"
    )
    return Material(
        root=root, ca=write("ca.pem", ca.pem),
        server_cert=write("server.pem", server_cert), server_key=write("server.key", server_key),
        client_cert=write("client.pem", client_cert), client_key=write("client.key", client_key),
        rogue_cert=write("rogue.pem", rogue_cert), rogue_key=write("rogue.key", rogue_key),
        tokens=write("tokens", tokens.encode()),
        inference_token=inference, metadata_token=metadata, admin_token=admin,
    )
