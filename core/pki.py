"""The organization's certificate authority and its nodes' certificates (issue 11, §4).

Every internal link (hub to hub, hub to mailbox server, a client to a mailbox server) is TLS
verified against the organization's own CA, never the system's store: a certificate any
public CA would sign for any name proves nothing about being a node of this organization.

A node's identity is a DNS name under ``mailyard.internal`` (``.internal`` is reserved for
private use), which the peer checks as a hostname, so a connection to the wrong node fails in
the handshake, before anything is sent:

    <site>.hub.mailyard.internal          every hub of the site (one certificate per site)
    <server>.mailbox.mailyard.internal    one mailbox server
    <edge>.edge.mailyard.internal         one Edge Transport server (issued at its subscription,
                                          for the key it generated: the key never leaves it)

One certificate per site for all its hubs, rather than one per hub: a hub relaying to a site
wants *a* hub of that site, whichever answers, and hubs scaled with ``--scale hub=N`` get
their identity from a volume without an enrolment step, while the CA key stays where
certificates are issued (``site up``'s data directory, compose's ``init`` service).

Layout of a PKI directory (``<data-dir>/pki``):

    ca.crt                       the CA's certificate: every node trusts it and nothing else
    ca.key                       its key, 0600: only where certificates are issued
    hub-<site>.crt / .key        the site's hubs
    mailbox-<server>.crt / .key  a mailbox server
"""

from __future__ import annotations

import datetime
import os
import re
import secrets
import ssl
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mailyard.errors import SiteError

ENV_DIR = "MAILYARD_PKI_DIR"
DOMAIN = "mailyard.internal"
CA_CERT, CA_KEY = "ca.crt", "ca.key"
CA_DAYS = 10 * 365
NODE_DAYS = 2 * 365
RENEW_DAYS = 30  # a node certificate this close to its end is issued again


def dns_label(name: str) -> str:
    """An organization name (``MBX-AMS-01``, ``New York``) as one DNS label, or "" if it
    makes none (the organization file's check refuses such a name, and two that make one)."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    return label if 0 < len(label) <= 63 else ""


def _label(name: str) -> str:
    label = dns_label(name)
    if not label:
        raise SiteError(f"{name!r} cannot be made a DNS label for a certificate")
    return label


@dataclass(frozen=True)
class Identity:
    """Who a certificate says its holder is: a site's hubs, or one mailbox server."""

    role: str  # "hub", "mailbox" or "edge"
    name: str  # the site (hubs) or the server (mailbox servers), as the organization spells it

    @classmethod
    def hub(cls, site: str) -> Identity:
        return cls("hub", site)

    @classmethod
    def mailbox(cls, server: str) -> Identity:
        return cls("mailbox", server)

    @classmethod
    def edge(cls, name: str) -> Identity:
        return cls("edge", name)

    @property
    def dns_name(self) -> str:
        return f"{_label(self.name)}.{self.role}.{DOMAIN}"

    @property
    def file_stem(self) -> str:
        return f"{self.role}-{_label(self.name)}"

    def __str__(self) -> str:
        return f"{self.role} {self.name}"


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the start, and replace it atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _check_private(path: Path) -> None:
    st = path.stat()
    if st.st_mode & 0o077:
        raise SiteError(f"{path} may be read by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
                        "it is a private key: `chmod 600` it, or delete it to have a new one made")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class CA:
    """The organization's certificate authority in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.cert_path = self.dir / CA_CERT
        self.key_path = self.dir / CA_KEY

    def exists(self) -> bool:
        return self.cert_path.exists() and self.key_path.exists()

    def init(self, organization: str) -> bool:
        """Create the CA unless it exists; True if it was created now."""
        if self.exists():
            _check_private(self.key_path)
            return False
        if self.cert_path.exists() or self.key_path.exists():
            raise SiteError(f"{self.dir} holds half a CA (one of {CA_CERT}, {CA_KEY}); remove it or restore the other")
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{organization} Mailyard CA"),
        ])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            # Name constraints: this CA can only vouch for Mailyard's internal names, so trusting
            # it (a client's ca bundle, say) never lets it speak for a public site.
            .add_extension(x509.NameConstraints(permitted_subtrees=[x509.DNSName(DOMAIN)],
                                                excluded_subtrees=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        _write_private(self.key_path, _pem_key(key))
        _write_public(self.cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return True

    def _load(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if not self.exists():
            raise SiteError(f"no certificate authority in {self.dir}: run `mailyard org ca init`")
        _check_private(self.key_path)
        cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SiteError(f"{self.key_path} is not an EC key")
        return cert, key

    def issue(self, identity: Identity, out_dir: Path | None = None) -> NodeCert:
        """The node's certificate in ``out_dir`` (default: beside the CA), issued now unless a
        valid one from this CA is there already."""
        node = NodeCert(Path(out_dir or self.dir), identity)
        if node.valid_from(self):
            return node
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.issue_for_key(identity, key.public_key())
        node.dir.mkdir(parents=True, exist_ok=True)
        _write_private(node.key_path, _pem_key(key))
        _write_public(node.cert_path, cert)
        if node.dir != self.dir:
            _write_public(node.ca_path, self.cert_path.read_bytes())
        return node

    def issue_for_key(self, identity: Identity, public_key: ec.EllipticCurvePublicKey) -> bytes:
        """A certificate (PEM) for ``identity`` and a key its holder made and keeps (an Edge's,
        from its subscription file)."""
        ca_cert, ca_key = self._load()
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.dns_name)]))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=NODE_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(identity.dns_name)]), critical=False)
            # Both ends of a link: a hub is a server to other hubs and a client of them.
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)


class NodeCert:
    """A node's certificate and key, and the CA it trusts, in one PKI directory."""

    def __init__(self, directory: Path, identity: Identity) -> None:
        self.dir = Path(directory)
        self.identity = identity
        self.cert_path = self.dir / f"{identity.file_stem}.crt"
        self.key_path = self.dir / f"{identity.file_stem}.key"
        self.ca_path = self.dir / CA_CERT

    def valid_from(self, ca: CA) -> bool:
        """True if a certificate for this identity, issued by ``ca``, is here and not near its end."""
        try:
            cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            ca_cert = x509.load_pem_x509_certificate(ca.cert_path.read_bytes())
            if not self.key_path.exists():
                return False
            cert.verify_directly_issued_by(ca_cert)
        except (OSError, ValueError, TypeError, InvalidSignature):
            return False
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        fresh = cert.not_valid_after_utc - _now() > datetime.timedelta(days=RENEW_DAYS)
        return fresh and names.get_values_for_type(x509.DNSName) == [self.identity.dns_name]

    def check(self) -> None:
        for path in (self.cert_path, self.key_path, self.ca_path):
            if not path.exists():
                raise SiteError(f"{path} is missing: the {self.identity} has no certificate of the "
                                "organization (`mailyard org ca init <file>` makes them, as `site up` does)")
        _check_private(self.key_path)

    def server_context(self, *, client_certs: bool) -> ssl.SSLContext:
        """A listener's context. With ``client_certs``, a client may present a certificate of
        the organization (CERT_OPTIONAL: one that does not verify fails the handshake; none at
        all leaves the client to log on another way)."""
        self.check()
        # Not ssl.create_default_context(Purpose.CLIENT_AUTH): that also trusts the system's CA
        # store for client certificates, and a client certificate must verify against the
        # organization's CA and nothing else.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_path, self.key_path)
        if client_certs:
            ctx.load_verify_locations(cafile=str(self.ca_path))
            ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A context for a link to another node: it presents this node's certificate and
        verifies the peer against the organization's CA only (pass the peer's
        ``Identity.dns_name`` as the server name)."""
        self.check()
        ctx = trust_context(self.ca_path)
        ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx


def trust_context(ca_path: Path) -> ssl.SSLContext:
    """A client context that trusts the organization's CA and nothing else (the CLI's, for
    mailbox servers): the certificate must verify and name the node asked for."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(ca_path))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def sni(identity: Identity) -> dict[str, str]:
    """httpx request extensions that make ``identity`` the TLS server name (SNI and the
    name the certificate must carry), whatever address the URL has."""
    return {"sni_hostname": identity.dns_name}


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> Identity | None:
    """The organization identity a verified peer certificate names, or None (no TLS, no
    certificate, or a name that is not a node's). Only meaningful with a context that
    verifies against the organization's CA (``server_context(client_certs=True)``)."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:  # none presented, or not verified (getpeercert() is empty then)
        return None
    for entry in cert.get("subjectAltName", ()):
        kind, value = entry[0], entry[1]
        if kind != "DNS" or not isinstance(value, str) or not value.endswith("." + DOMAIN):
            continue
        label, _, role = value[: -len(DOMAIN) - 1].partition(".")
        if role in ("hub", "mailbox", "edge") and label:
            return Identity(role, label)
    return None


def matches(identity: Identity | None, expected: Identity) -> bool:
    """Does a peer's identity (labels, as a certificate carries them) name ``expected``?"""
    return identity is not None and identity.role == expected.role and identity.name == _label(expected.name)


def self_signed(name: str) -> tuple[bytes, bytes]:
    """A new key and a self-signed certificate for it (PEM key, PEM certificate) naming ``name``
    (an Edge's own, Exchange's "Edge-Cert": what its subscription file carries and the hubs pin)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=NODE_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _pem_key(key), cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(pem: bytes | str) -> str:
    """A certificate's SHA-256 fingerprint, hex (what a pinned certificate is compared by)."""
    data = pem.encode() if isinstance(pem, str) else pem
    return x509.load_pem_x509_certificate(data).fingerprint(hashes.SHA256()).hex()


def der_fingerprint(der: bytes) -> str:
    """``fingerprint`` of a certificate in DER (what ``getpeercert(binary_form=True)`` gives)."""
    return x509.load_der_x509_certificate(der).fingerprint(hashes.SHA256()).hex()


def public_key_of(pem: bytes | str) -> ec.EllipticCurvePublicKey:
    """The EC public key a certificate (PEM) carries; SiteError for any other kind."""
    data = pem.encode() if isinstance(pem, str) else pem
    key = x509.load_pem_x509_certificate(data).public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SiteError("the certificate's key is not an EC key")
    return key


def check_private(path: Path) -> None:
    """SiteError if ``path`` (a secret) may be read by other users."""
    _check_private(path)


def write_private(path: Path, data: bytes) -> None:
    """``data`` in ``path``, mode 0600 from the start, replaced atomically."""
    _write_private(path, data)


def write_public(path: Path, data: bytes) -> None:
    _write_public(path, data)


def pki_dir(data_dir: Path) -> Path:
    """Where a node finds its certificate: ``$MAILYARD_PKI_DIR``, else ``<data-dir>/pki``."""
    return Path(os.environ.get(ENV_DIR) or Path(data_dir) / "pki")


def node_identities(sites: Iterable[tuple[str, Iterable[str]]]) -> list[Identity]:
    """The identities of an organization's nodes: each site's hubs, each mailbox server
    (``sites``: pairs of a site's name and its mailbox servers)."""
    out = []
    for site, servers in sites:
        out.append(Identity.hub(site))
        out += [Identity.mailbox(server) for server in servers]
    return out


def export(ca: CA, identity: Identity, directory: Path, *, owner: int | None = None) -> Path:
    """Copy a node's certificate, its key and the CA's certificate (never the CA's key) into
    ``directory`` (mode 0700; the key 0600), for a node that runs elsewhere: a container's
    volume. ``owner``: the uid to give them to (the node's user, when this runs as root)."""
    node = ca.issue(identity)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    copy = NodeCert(directory, identity)
    _write_private(copy.key_path, node.key_path.read_bytes())
    _write_public(copy.cert_path, node.cert_path.read_bytes())
    _write_public(copy.ca_path, ca.cert_path.read_bytes())
    if owner is not None:
        for path in (directory, copy.key_path, copy.cert_path, copy.ca_path):
            os.chown(path, owner, owner)
    return directory


def issue_all(directory: Path, organization: str, sites: Iterable[tuple[str, Iterable[str]]]) -> CA:
    """The CA in ``directory`` (made if missing) and a certificate there for every node."""
    ca = CA(directory)
    ca.init(organization)
    for identity in node_identities(sites):
        ca.issue(identity)
    return ca
