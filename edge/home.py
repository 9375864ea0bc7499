"""An Edge's own files: who it is, its keys, and its subscription (``<data-dir>/edge``).

    edge.json      0600  name, FQDN, SMTP and EdgeSync addresses, the recipient salt, the
                         bootstrap secret's hash and expiry, and the subscription once made
    edge.key       0600  its private key (never leaves the Edge)
    edge.crt             its self-signed certificate (Exchange's Edge-Cert): EdgeSync's listener
                         presents it, and the hubs pin it from the subscription file
    ../pki/        the organization's CA and the certificate it issued for edge.key
                   (``edge-<name>.crt`` / ``.key``), from the first EdgeSync (mailyard.pki layout)
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailyard import passwords, pki
from mailyard.edgesync import DEFAULT_VALIDITY, MAX_EDGE_NAME, MIN_VALIDITY, SubscriptionFile
from mailyard.errors import SiteError


@dataclass
class Subscribed:
    organization: str
    site: str
    at: float


class EdgeHome:
    """The Edge's directory in ``<data-dir>``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.dir = self.data_dir / "edge"
        self.config_path = self.dir / "edge.json"
        self.key_path = self.dir / "edge.key"
        self.cert_path = self.dir / "edge.crt"

    # region: reading

    def exists(self) -> bool:
        return self.config_path.exists()

    def config(self) -> dict[str, Any]:
        if not self.config_path.exists():
            raise SiteError(f"{self.data_dir} holds no Edge: run `mailyard edge subscribe --data-dir {self.data_dir}` "
                            "first")
        pki.check_private(self.config_path)
        return dict(json.loads(self.config_path.read_text()))

    @property
    def name(self) -> str:
        return str(self.config()["name"])

    def listen(self, what: str) -> str:
        """Where the Edge listens for ``smtp`` or ``sync`` (the address hubs reach, unless another was given)."""
        config = self.config()
        return str(config.get(f"{what}_listen") or config[what])

    def subscribed(self) -> Subscribed | None:
        found = self.config().get("subscribed")
        return Subscribed(found["organization"], found["site"], float(found["at"])) if found else None

    def node_cert(self) -> pki.NodeCert:
        """The certificate the organization's CA issued for this Edge (after the first EdgeSync)."""
        return pki.NodeCert(pki.pki_dir(self.data_dir), pki.Identity.edge(self.name))

    # endregion

    def _write(self, config: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        pki.write_private(self.config_path, json.dumps(config, indent=2).encode())

    def subscribe(self, *, name: str, fqdn: str, smtp: str, sync: str, validity: float = DEFAULT_VALIDITY,
                  now: float | None = None, smtp_listen: str = "", sync_listen: str = "") -> SubscriptionFile:
        """A new subscription file (New-EdgeSubscription -FileName): a key and certificate made
        the first time, a new bootstrap secret every time (the old one no longer bootstraps).
        An Edge already subscribed is refused: remove its subscription first.

        ``smtp`` and ``sync`` are the addresses the hubs reach the Edge at; ``smtp_listen`` and
        ``sync_listen`` where it listens, when that is another (``0.0.0.0:25`` behind a name,
        a NAT, a container on several networks)."""
        if validity < MIN_VALIDITY:
            raise SiteError(f"a bootstrap secret must be valid at least {MIN_VALIDITY:.0f} s "
                            "(Exchange's minimum AccountExpiryDuration, 2 minutes)")
        if not pki.dns_label(name) or len(name) > MAX_EDGE_NAME:
            raise SiteError(f"{name!r} cannot name an Edge: at most {MAX_EDGE_NAME} characters that make a DNS label "
                            "(letters, digits, dashes)")
        config = self.config() if self.exists() else {}
        if config.get("subscribed"):
            s = config["subscribed"]
            raise SiteError(f"this Edge is subscribed to site {s['site']} of {s['organization']} already: "
                            f"`mailyard edge unsubscribe --data-dir {self.data_dir}` first")
        if config and config.get("name") != name:
            raise SiteError(f"this Edge is named {config['name']!r}; its name cannot change (its certificate names it)")
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not (self.key_path.exists() and self.cert_path.exists()):
            key, cert = pki.self_signed(fqdn)
            pki.write_private(self.key_path, key)
            pki.write_public(self.cert_path, cert)
        now = time.time() if now is None else now
        secret = secrets.token_urlsafe(32)
        config.update({
            "name": name, "fqdn": fqdn, "smtp": smtp, "sync": sync,
            "smtp_listen": smtp_listen or smtp, "sync_listen": sync_listen or sync,
            "recipient_salt": config.get("recipient_salt") or secrets.token_hex(16),
            "bootstrap": {"hash": passwords.hash_password(secret), "expires": now + validity},
        })
        self._write(config)
        return SubscriptionFile(edge=name, fqdn=fqdn, smtp=smtp, sync=sync, certificate=self.cert_path.read_text(),
                                bootstrap_secret=secret, recipient_salt=config["recipient_salt"],
                                effective=now, duration=validity)

    def accept_bootstrap(self, secret: str, *, organization: str, site: str, ca: str, issued: str,
                         now: float | None = None) -> bool:
        """The first EdgeSync: True if ``secret`` is this Edge's unexpired bootstrap secret (and
        then the CA and the issued certificate are stored and the Edge is subscribed). The same
        push again (its hub died before it heard the answer) is accepted again; any other once
        subscribed is not."""
        config = self.config()
        boot = config.get("bootstrap") or {}
        now = time.time() if now is None else now
        if not boot or now >= float(boot["expires"]) or not passwords.verify(secret, str(boot["hash"])):
            return False
        node = self.node_cert()
        if config.get("subscribed"):  # the same push again, or nothing: never another CA
            return (node.ca_path.exists() and node.ca_path.read_text() == ca
                    and node.cert_path.exists() and node.cert_path.read_text() == issued)
        if pki.public_key_of(issued).public_numbers() != pki.public_key_of(self.cert_path.read_text()).public_numbers():
            raise SiteError("the issued certificate is not for this Edge's key")
        node.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        pki.write_private(node.key_path, self.key_path.read_bytes())
        pki.write_public(node.cert_path, issued.encode())
        pki.write_public(node.ca_path, ca.encode())
        config["subscribed"] = {"organization": organization, "site": site, "at": now}
        self._write(config)
        return True

    def unsubscribe(self) -> None:
        """Forget the subscription (Remove-EdgeSubscription on the Edge): the organization's
        certificates go, the Edge's own key stays; a new ``subscribe`` makes a new secret."""
        config = self.config()
        config.pop("subscribed", None)
        config.pop("bootstrap", None)
        self._write(config)
        node = self.node_cert()
        for path in (node.cert_path, node.key_path, node.ca_path):
            path.unlink(missing_ok=True)
