"""The Edge's EdgeSync listener: HTTPS, one way in, from the hubs of the site it is subscribed to.

It presents the Edge's self-signed certificate (the one the subscription file carries, which the
hubs pin). Before the subscription only ``POST /edgesync/bootstrap`` with the file's unexpired
secret is taken; it brings the organization's CA, which from then on verifies client
certificates (CERT_OPTIONAL, loaded into the running context), and every other request must
come with the certificate of a hub of the subscribed site (401 without one, 403 with another).
Bodies are JSON (mailyard.edgesync); a body that does not parse is a 400 naming what is wrong.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mailyard import keys, pki
from mailyard.edge.home import EdgeHome
from mailyard.edge.organization import edge_organization
from mailyard.edgesync import BOOTSTRAP_PATH, CONFIG_PATH, RECIPIENTS_PATH, Bootstrap, ConfigPush, RecipientsPush
from mailyard.errors import SiteError
from mailyard.orgstore import apply_org
from mailyard.peer_http import PEER
from mailyard.redisconn import number

log = logging.getLogger("mailyard.edge.sync")

MAX_BODY = 256 * 1024 * 1024  # four million recipients' hashes fit
MAX_BOOTSTRAP = 64 * 1024  # a secret and two certificates
CHUNK = 10_000


class Refused(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


def _parse(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        wrong = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(body)'}: {e['msg']}" for e in exc.errors()[:5])
        raise Refused(400, f"not a valid {model.__name__}: {wrong}") from None


class Trust:
    """The listener's TLS context and the organization CA it verifies client certificates
    against. A context can only be given more CAs, never fewer: once the Edge's CA file is no
    longer the one loaded (unsubscribed and subscribed elsewhere), pushes wait for a restart."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.ca: str | None = None  # the fingerprint of the CA loaded

    def load(self, ca_path: Path) -> None:
        """From now on the listener verifies client certificates against this CA (new
        handshakes; the context is the one the listener runs with)."""
        self.ctx.load_verify_locations(cafile=str(ca_path))
        self.ctx.verify_mode = ssl.CERT_OPTIONAL
        self.ca = pki.fingerprint(ca_path.read_bytes())

    def current(self, ca_path: Path) -> bool:
        try:
            return self.ca is not None and pki.fingerprint(ca_path.read_bytes()) == self.ca
        except (OSError, ValueError):
            return False


def create_app(home: EdgeHome, r: redis.Redis, trust: Trust,
               on_config: Callable[[], None] = lambda: None, rspamd_url: str = "",
               dns_servers: list[str] | None = None) -> Starlette:
    """``trust``: the listener's TLS context (the CA goes into it at the bootstrap).
    ``on_config``: called after a configuration was stored (the transport may start).
    ``dns_servers``: the Edge's own (``edge run --dns-server``) instead of the organization's."""

    async def body_of(request: Request, limit: int = MAX_BODY) -> bytes:
        """The body, read no further than ``limit`` bytes (chunked or not)."""
        try:
            declared = int(request.headers.get("content-length") or 0)
        except ValueError:
            raise Refused(400, "Content-Length is not a number") from None
        if declared > limit:
            raise Refused(413, f"the body is larger than {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise Refused(413, f"the body is larger than {limit} bytes")
        return bytes(body)

    def require_hub(request: Request) -> str:
        subscribed = home.subscribed()
        if subscribed is None:
            raise Refused(409, f"Edge {home.name} is not subscribed yet: the first EdgeSync is the bootstrap")
        if not trust.current(home.node_cert().ca_path):
            raise Refused(409, f"Edge {home.name} was subscribed anew since it started: restart it")
        peer = getattr(request.state, PEER, None)
        if peer is None:
            raise Refused(401, f"EdgeSync needs the certificate of a hub of site {subscribed.site}")
        if not pki.matches(peer, pki.Identity.hub(subscribed.site)):
            raise Refused(403, f"the certificate of {peer} may not push to Edge {home.name} "
                               f"(only hubs of site {subscribed.site})")
        return subscribed.site

    def handler(fn: Callable[[Request], Awaitable[dict[str, Any]]]) -> Callable[[Request], Awaitable[JSONResponse]]:
        async def wrapped(request: Request) -> JSONResponse:
            try:
                return JSONResponse(await fn(request))
            except Refused as exc:
                return JSONResponse({"error": exc.error}, status_code=exc.status)
            except (SiteError, redis.RedisError) as exc:
                log.warning("EdgeSync %s failed: %s", request.url.path, exc)
                return JSONResponse({"error": f"the Edge could not take it now: {exc}"}, status_code=503,
                                    headers={"Retry-After": "5"})
        return wrapped

    @handler
    async def bootstrap(request: Request) -> dict[str, Any]:
        push: Bootstrap = _parse(Bootstrap, await body_of(request, MAX_BOOTSTRAP))
        # (scrypt, slow on purpose: in a thread, so that guessing does not stall the listener)
        if not await asyncio.to_thread(home.accept_bootstrap, push.secret, organization=push.organization,
                                       site=push.site, ca=push.ca, issued=push.issued):
            raise Refused(403, "the bootstrap secret is wrong or has expired, or this Edge is subscribed already: "
                               "run `mailyard edge subscribe` on the Edge and import the new file")
        if trust.ca is None:
            trust.load(home.node_cert().ca_path)
        r.hset(keys.EDGE_STATE, mapping={"organization": push.organization, "site": push.site,
                                         "subscribed_at": time.time()})
        log.info("subscribed to site %s of %s", push.site, push.organization)
        return {"edge": home.name, "site": push.site}

    @handler
    async def config(request: Request) -> dict[str, Any]:
        site = require_hub(request)
        push: ConfigPush = _parse(ConfigPush, await body_of(request))
        if push.site != site:
            raise Refused(403, f"this Edge is subscribed to site {site}, not {push.site}")
        # A push made of an older organization than the last one taken (a hub that read it
        # just before an `org apply`, sending after the hub that read the new one) changes nothing
        taken = number(r.hget(keys.EDGE_STATE, "org_version"))
        if push.org_version and push.org_version < taken:
            log.info("ignored a configuration of organization version %d: version %d is here",
                     push.org_version, taken)
            return {"edge": home.name, "stale": True}
        settings = home.config()
        org = edge_organization(push, name=settings["name"], fqdn=settings["fqdn"], smtp=home.listen("smtp"),
                                 salt=settings["recipient_salt"], rspamd=rspamd_url, dns_servers=dns_servers)
        version = apply_org(r, org)
        r.hset(keys.EDGE_STATE, mapping={"config_at": time.time(), "config_version": version,
                                         "org_version": push.org_version,
                                         "by": str(getattr(request.state, PEER, ""))})
        on_config()
        return {"edge": home.name, "version": version}

    @handler
    async def recipients(request: Request) -> dict[str, Any]:
        require_hub(request)
        push: RecipientsPush = _parse(RecipientsPush, await body_of(request))
        pipe = r.pipeline(transaction=True)
        for key, hashes in ((keys.EDGE_RECIPIENTS, push.hashes), (keys.EDGE_CLOSED_GROUPS, push.closed)):
            staging = keys.edge_staging(key)
            pipe.delete(staging)
            for i in range(0, len(hashes), CHUNK):
                pipe.sadd(staging, *hashes[i:i + CHUNK])
            if hashes:
                pipe.rename(staging, key)
            else:
                pipe.delete(key)
        pipe.hset(keys.EDGE_STATE, mapping={"recipients_at": time.time(), "recipients": len(set(push.hashes)),
                                            "by": str(getattr(request.state, PEER, ""))})
        pipe.execute()
        return {"edge": home.name, "recipients": len(set(push.hashes))}

    return Starlette(routes=[
        Route(BOOTSTRAP_PATH, bootstrap, methods=["POST"]),
        Route(CONFIG_PATH, config, methods=["POST"]),
        Route(RECIPIENTS_PATH, recipients, methods=["POST"]),
    ])
