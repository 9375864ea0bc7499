"""EdgeSync on the hubs: push the organization to the site's Edges, one way (mailyard.edgesync).

Every hub of a site runs the pusher; for each Edge subscribed to the site one hub at a time
holds its lease (``my:edge:sync-lease:<edge>``), so an Edge is pushed to by one hub and by
another when that one dies. Configuration is pushed every ``edge_sync_config_interval``,
recipients every ``edge_sync_recipient_interval``, both at once when ``mailyard org edge sync``
asks (``my:edge:sync-now:<edge>``) or the organization changed. What happened is kept in
``my:edge:sync:<edge>`` for ``mailyard org edge list``.

The link: HTTPS to the Edge's EdgeSync listener, whose certificate must be the self-signed one
of its subscription file (pinned: the only certificate this client trusts, so a man in the
middle with any other certificate, public CA or not, gets nothing, the secret included). The
first push uses the bootstrap secret; every later one presents the site's hub certificate.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from typing import Any

import httpx
import redis

from mailyard import dkim_keys, keys, registry
from mailyard.edgesync import (
    BOOTSTRAP_PATH,
    CONFIG_PATH,
    RECIPIENTS_PATH,
    Bootstrap,
    config_push,
    recipients_push,
)
from mailyard.hub.node import Node
from mailyard.org import EdgeSubscription, Organization
from mailyard.redisconn import text, text_map

log = logging.getLogger("mailyard.hub.edgesync")

TIMEOUT_S = 30.0
LEASE_MS = 4 * int(TIMEOUT_S * 1000)  # longer than one sync's posts; renewed before each
GIVE_UP_AFTER = 3  # failed passes in a row, then the lease goes: another hub of the site tries


class EdgeSyncError(Exception):
    """A push that did not land; the text says why (kept as the Edge's last sync error)."""


def pinned_context(sub: EdgeSubscription, client_cert: tuple[str, str] | None = None) -> ssl.SSLContext:
    """A client context that trusts exactly the Edge's self-signed certificate (no name is
    checked: the certificate itself is the identity), presenting ``client_cert`` if given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=sub.certificate)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if client_cert:
        ctx.load_cert_chain(*client_cert)
    return ctx


def _verify_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure under an httpx error (httpcore wraps it), if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _post(sub: EdgeSubscription, path: str, body: str, ctx: ssl.SSLContext) -> dict[str, Any]:
    url = f"https://{sub.sync}{path}"
    try:
        with httpx.Client(verify=ctx, timeout=TIMEOUT_S, trust_env=False) as client:
            response = client.post(url, content=body, headers={"Content-Type": "application/json"})
    except httpx.ConnectError as exc:
        if (cause := _verify_error(exc)) is not None:
            raise EdgeSyncError(f"{sub.sync} did not present the certificate of Edge {sub.name}'s subscription "
                                f"({cause.verify_message}): nothing sent") from None
        raise EdgeSyncError(f"cannot reach Edge {sub.name} at {sub.sync}: {exc}") from None
    except httpx.HTTPError as exc:
        raise EdgeSyncError(f"EdgeSync to {sub.name} at {sub.sync} failed: {exc}") from None
    if response.status_code != 200:
        try:
            why = response.json().get("error", response.text)
        except ValueError:
            why = response.text
        raise EdgeSyncError(f"Edge {sub.name} refused {path} ({response.status_code}): {why}")
    return response.json()


def hub_endpoints(r: redis.Redis, org: Organization, site: str) -> list[str]:
    """HOST:PORT of each live hub of ``site`` at a receive connector that takes Exchange
    servers by certificate: the Edge's next hops for the organization's mail."""
    takes_servers = {c.name for c in org.receive_connectors
                     if c.enabled and "ExchangeServers" in c.permission_groups and "ExchangeServer" in c.auth_mechanisms
                     and (not c.sites or site in c.sites)}
    out = []
    for hub in registry.hubs(r):
        if hub.site != site or not hub.alive(org.transport.hub_heartbeat_timeout):
            continue
        for name, address in sorted(hub.endpoints.items()):
            if name in takes_servers:
                out.append(address)
                break
    return sorted(out)


class Pusher:
    """One hub's EdgeSync: ``run_once`` pushes what is due to every Edge of its site."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._org_version: dict[str, int] = {}  # per Edge: the organization version it last got
        self._failures: dict[str, int] = {}

    def _client_cert(self) -> tuple[str, str]:
        cert = self.node.node_cert
        cert.check()
        return str(cert.cert_path), str(cert.key_path)

    def run_once(self, now: float | None = None) -> list[str]:
        """Push what is due; returns what was pushed ("<edge>: config", ...)."""
        now = time.time() if now is None else now
        version, directory = self.node.orgs.snapshot()
        org = directory.org
        done = []
        for sub in org.edge_subscriptions:
            if sub.site != self.node.site:
                continue
            r = self.node.r
            if not self._hold(sub.name):
                continue
            try:
                done += self.sync(sub, org, now, version=version)
                self._failures.pop(sub.name, None)
            except Exception as exc:  # (whatever it is, it is this Edge's error, not the pass's)
                why = str(exc) if isinstance(exc, EdgeSyncError) else f"{type(exc).__name__}: {exc}"
                log.warning("EdgeSync to %s: %s", sub.name, why)
                r.hset(keys.edge_sync(sub.name), mapping={"error": why, "error_at": now})
                self._failures[sub.name] = failures = self._failures.get(sub.name, 0) + 1
                if failures >= GIVE_UP_AFTER:  # (this hub may be the one that cannot reach it)
                    self._failures.pop(sub.name)
                    if text(r.get(keys.edge_sync_lease(sub.name))) == self.node.name:
                        r.delete(keys.edge_sync_lease(sub.name))
        return done

    def _hold(self, edge: str) -> bool:
        """Take or renew the lease of pushing to ``edge``; False if another hub holds it."""
        r, lease = self.node.r, keys.edge_sync_lease(edge)
        if r.set(lease, self.node.name, nx=True, px=LEASE_MS):
            return True
        if text(r.get(lease)) != self.node.name:
            return False
        r.pexpire(lease, LEASE_MS)
        return True

    def sync(self, sub: EdgeSubscription, org: Organization, now: float, *, version: int,
             force: bool = False) -> list[str]:
        """Push what is due of ``org``, the organization's ``version`` (read with it)."""
        r, state_key = self.node.r, keys.edge_sync(sub.name)
        state = text_map(r.hgetall(state_key))
        asked = r.get(keys.edge_sync_now(sub.name))
        changed = self._org_version.get(sub.name) not in (None, version)
        done = []
        if state.get("bootstrapped") != "1":
            self.bootstrap(sub, org)
            # (marked before the secret goes: a hub that dies between the two leaves a secret
            # that expires by itself, never a subscription that cannot bootstrap again)
            r.hset(state_key, mapping={"bootstrapped": "1", "by": self.node.name})
            r.delete(keys.edge_bootstrap(sub.name))
            done.append(f"{sub.name}: bootstrap")
            force = True
        settings = org.transport
        ctx = pinned_context(sub, self._client_cert())
        due_config = now - float(state.get("config_at", 0)) >= settings.edge_sync_config_interval
        # The hubs it delivers to changed (one started again on other ports, one died): at
        # once, not at the next interval, or the Edge's mail waits for hubs that are gone.
        hubs = hub_endpoints(r, org, sub.site)
        moved = bool(hubs) and " ".join(hubs) != state.get("hubs")
        if force or asked or changed or due_config or moved:
            if not hubs:  # (a restart of every hub: better the Edge keeps the list it has)
                raise EdgeSyncError(f"no live hub of site {sub.site} has a receive connector for Exchange servers "
                                    "(ExchangeServers, ExchangeServer): nothing to tell the Edge")
            push = config_push(org, sub.site, sub.name, hubs, now, dkim=dkim_keys.all_keys(r), org_version=version)
            self._hold(sub.name)
            _post(sub, CONFIG_PATH, push.model_dump_json(), ctx)
            r.hset(state_key, mapping={"config_at": now, "by": self.node.name, "error": "", "hubs": " ".join(hubs)})
            done.append(f"{sub.name}: config")
        due_recipients = now - float(state.get("recipients_at", 0)) >= settings.edge_sync_recipient_interval
        if force or asked or changed or due_recipients:
            recipients = recipients_push(org, sub.recipient_salt, now)
            self._hold(sub.name)
            _post(sub, RECIPIENTS_PATH, recipients.model_dump_json(), ctx)
            r.hset(state_key, mapping={"recipients_at": now, "recipients": len(recipients.hashes),
                                       "by": self.node.name, "error": ""})
            done.append(f"{sub.name}: recipients")
        self._org_version[sub.name] = version
        if asked:  # (unless asked again meanwhile)
            r.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end", 1,
                   keys.edge_sync_now(sub.name), asked)
        return done

    def bootstrap(self, sub: EdgeSubscription, org: Organization) -> None:
        secret = text(self.node.r.get(keys.edge_bootstrap(sub.name)))
        if not secret:
            raise EdgeSyncError(f"the bootstrap secret of Edge {sub.name} has expired before the first EdgeSync: "
                                "run `mailyard edge subscribe` on the Edge again and import the new file")
        ca = self.node.node_cert.ca_path.read_text()
        body = Bootstrap(secret=secret, organization=org.name, site=sub.site, ca=ca, issued=sub.issued)
        _post(sub, BOOTSTRAP_PATH, body.model_dump_json(), pinned_context(sub))


def run(node: Node, stop: threading.Event) -> None:
    """The pusher's loop (a thread of ``Services``): look once a second."""
    pusher = Pusher(node)
    while not stop.is_set():
        try:
            if done := pusher.run_once():
                log.info("EdgeSync: %s", ", ".join(done))
        except Exception as exc:  # Redis away, an organization being applied: next second
            log.warning("EdgeSync pass failed: %s", exc)
        stop.wait(1.0)
