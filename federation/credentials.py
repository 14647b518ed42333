"""Certificates and keys for a real deployment: the SuperLink's TLS certificate and each site's auth key.

Who holds what (see docs/federation-security.md):
  - the coordinating centre (runs the SuperLink): `ca.crt` (or the hospital PKI's root), `server.pem` +
    `server.key` whose subjectAltName lists every address the sites use to reach it, and the *public*
    key of every site it admits (`flwr supernode register site.pub <connection>`);
  - each site (runs a SuperNode): `ca.crt` to check the SuperLink, and its own *private* key, which
    never leaves the site (`flower-supernode --auth-supernode-private-key site.key`).
Site keys are ECDSA on NIST P-384 in OpenSSH format, what Flower 1.42 reads. A SuperLink started with
`--enable-supernode-auth` refuses any SuperNode whose public key is not registered.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(folder: str | Path, name: str = "wbc federation CA", days: int = 3650) -> dict[str, Path]:
    """A self-signed CA (ca.crt, ca.key) for deployments without a hospital PKI; keep ca.key offline."""
    folder = Path(folder)
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA384())
    )
    paths = {"ca": folder / "ca.crt", "ca_key": folder / "ca.key"}
    folder.mkdir(parents=True, exist_ok=True)
    paths["ca"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths["ca_key"], _pem_key(key))
    return paths


def make_server_certificate(
    ca_cert: str | Path, ca_key: str | Path, hosts: Sequence[str], folder: str | Path, days: int = 397
) -> dict[str, Path]:
    """server.pem + server.key for the SuperLink, signed by the CA, valid for every name/IP in `hosts`."""
    if not hosts:
        raise ValueError("name at least one host (DNS name or IP address) the sites will connect to")
    ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    signer = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(signer, hashes.SHA384())  # type: ignore[arg-type]
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"server_cert": folder / "server.pem", "server_key": folder / "server.key"}
    paths["server_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths["server_key"], _pem_key(key))
    return paths


def make_site_key(folder: str | Path, site: str) -> dict[str, Path]:
    """<site>.key (private, OpenSSH, stays at the site) and <site>.pub (registered at the SuperLink)."""
    if not _SITE_RE.match(site):
        raise ValueError(f"invalid site name {site!r} (letters, digits, . _ -; max 64)")
    folder = Path(folder)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    paths = {"private": folder / f"{site}.key", "public": folder / f"{site}.pub"}
    _write_private(paths["private"], private)
    paths["public"].write_bytes(public + f" {site}\n".encode())
    return paths


def main(argv: list[str] | None = None) -> None:
    """`python -m federation.credentials ca|server|site ...` (what scripts/site-credentials.sh calls)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m federation.credentials", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    ca = sub.add_parser("ca", help="a self-signed CA (without a hospital PKI)")
    ca.add_argument("folder", type=Path)
    ca.add_argument("--name", default="wbc federation CA")
    server = sub.add_parser("server", help="the SuperLink's certificate, signed by the CA")
    server.add_argument("folder", type=Path)
    server.add_argument("--ca", type=Path, required=True, help="folder holding ca.crt and ca.key")
    server.add_argument("--host", action="append", required=True, help="DNS name or IP the sites use (repeat)")
    site = sub.add_parser("site", help="a site's auth key pair")
    site.add_argument("folder", type=Path)
    site.add_argument("site")
    args = parser.parse_args(argv)
    if args.what == "ca":
        paths = make_ca(args.folder, args.name)
    elif args.what == "server":
        paths = make_server_certificate(args.ca / "ca.crt", args.ca / "ca.key", args.host, args.folder)
    else:
        paths = make_site_key(args.folder, args.site)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
