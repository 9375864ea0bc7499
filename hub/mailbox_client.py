"""The store driver's RPC client: the only way a hub reaches a mailbox server (its HTTP API)."""

from __future__ import annotations

import base64
import ssl
from dataclasses import dataclass

import httpx
import redis

from mailyard import pki, registry
from mailyard.errors import NotFoundError, SiteError, TransientDeliveryError, smtp_reply

TIMEOUT = httpx.Timeout(30.0, connect=5.0)


@dataclass(frozen=True)
class MailboxResult:
    """What the mailbox server did for one recipient of one message."""

    msg: str
    recipient: str
    code: int
    status: str
    text: str

    @property
    def reply(self) -> str:
        return smtp_reply(self.code, self.status, self.text)


@dataclass(frozen=True)
class OutboxItem:
    """A message waiting in an Outbox, as a hub takes it."""

    mailbox: str
    id: str
    raw: bytes


class MailboxClient:
    """HTTPS with mutual TLS: the hub presents its site's certificate, and a mailbox server
    must present the certificate of the server the hub means to reach (its identity is the
    TLS server name, checked in the handshake, before anything is sent).

    One connection pool per mailbox server: httpx reuses a pooled connection by address, not
    by TLS server name, so with one shared pool a request for server Y whose registered URL
    named server M would travel over a connection verified as M."""

    def __init__(self, r: redis.Redis, hub: str, cert: pki.NodeCert) -> None:
        self._r = r
        self._hub = hub
        self._cert = cert
        self._ctx: ssl.SSLContext | None = None
        self._clients: dict[str, httpx.Client] = {}

    def _http(self, server: str) -> httpx.Client:
        client = self._clients.get(server)
        if client is None:
            if self._ctx is None:
                try:
                    self._ctx = self._cert.client_context()
                except SiteError as exc:  # no certificate (yet): nothing is sent, the queue retries
                    raise TransientDeliveryError(451, "4.7.5", f"STOREDRV: {exc}; nothing sent") from None
            client = self._clients[server] = httpx.Client(
                timeout=TIMEOUT, verify=self._ctx, limits=httpx.Limits(max_keepalive_connections=8))
        return client

    def _url(self, server: str) -> str:
        try:
            return registry.server_url(self._r, server)
        except NotFoundError as exc:
            raise TransientDeliveryError(451, "4.4.1", str(exc)) from None

    def _request(self, server: str, method: str, path: str, **kw) -> httpx.Response:
        try:
            response = self._http(server).request(
                method, self._url(server) + path, headers={"X-Mailyard-Hub": self._hub},
                extensions=pki.sni(pki.Identity.mailbox(server)), **kw)
        except httpx.HTTPError as exc:
            raise TransientDeliveryError(
                451, "4.4.1", f"STOREDRV: cannot reach mailbox server {server}: {exc!r}"
            ) from None
        if response.status_code >= 500 or response.status_code in (401, 403, 408, 429):
            raise TransientDeliveryError(
                451, "4.4.2", f"STOREDRV: mailbox server {server} answered {response.status_code}: "
                f"{_error_text(response)}"
            )
        return response

    def take_outbox(self, server: str, limit: int) -> list[OutboxItem]:
        """Up to ``limit`` waiting Outbox items of ``server``, oldest first, held for this hub
        (a lease) until it acknowledges them or the lease ends."""
        response = self._request(server, "POST", "/hub/outbox/take", json={"limit": limit})
        if response.status_code != 200:
            raise TransientDeliveryError(451, "4.4.2", f"STOREDRV: {server} gave no Outbox items: "
                                                       f"{_error_text(response)}")
        return [OutboxItem(i["mailbox"], i["id"], base64.b64decode(i["raw"])) for i in response.json()["items"]]

    def ack_outbox(self, server: str, items: list[tuple[str, str]]) -> None:
        """The hub has these items (durably): the server moves them to Sent Items."""
        payload = {"items": [{"mailbox": mailbox, "id": item} for mailbox, item in items]}
        response = self._request(server, "POST", "/hub/outbox/submitted", json=payload)
        if response.status_code != 200:
            raise TransientDeliveryError(451, "4.4.2", f"STOREDRV: {server} took no acknowledgement: "
                                                       f"{_error_text(response)}")

    def deliver(self, server: str, batch: list[tuple[str, list[str], bytes]]) -> list[MailboxResult]:
        payload = {
            "messages": [
                {"id": key, "recipients": rcpts, "raw": base64.b64encode(raw).decode()}
                for key, rcpts, raw in batch
            ]
        }
        response = self._request(server, "POST", "/hub/deliver", json=payload)
        if response.status_code != 200:
            raise TransientDeliveryError(
                451, "4.4.2", f"STOREDRV: delivery refused by {server}: {_error_text(response)}"
            )
        return [
            MailboxResult(r["id"], r["recipient"], int(r["code"]), r["status"], r["text"])
            for r in response.json()["results"]
        ]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except ValueError:
        return response.text[:200]
