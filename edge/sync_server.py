"""The Edge's EdgeSync listener: HTTPS, one way in, from the hubs of the site it is subscribed to.

It presents the Edge's self-signed certificate (the one the subscription file carries, which the
hubs pin). Before the subscription only ``POST /edgesync/bootstrap`` with the file's unexpired
secret is taken; it brings the organization's CA, which from then on verifies client
certificates (CERT_OPTIONAL, loaded into the running context), and every other request must
come with the certificate of a hub of the subscribed site (401 without one, 403 with another).
Bodies are JSON (mailyard.edgesync); a body that does not parse is a 400 naming what is wrong.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable, Callable
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

log = logging.getLogger("mailyard.edge.sync")

MAX_BODY = 64 * 1024 * 1024  # a million recipients' hashes fit
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


def trust_organization(ctx: ssl.SSLContext, ca_path: str) -> None:
    """From now on the listener verifies client certificates against the organization's CA
    (new handshakes; the context is the one the listener runs with)."""
    ctx.load_verify_locations(cafile=ca_path)
    ctx.verify_mode = ssl.CERT_OPTIONAL


def create_app(home: EdgeHome, r: redis.Redis, ctx: ssl.SSLContext,
               on_config: Callable[[], None] = lambda: None) -> Starlette:
    """``ctx``: the listener's TLS context (the CA goes into it at the bootstrap).
    ``on_config``: called after a configuration was stored (the transport may start)."""

    async def body_of(request: Request) -> bytes:
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_BODY:
            raise Refused(413, f"the body is larger than {MAX_BODY} bytes")
        body = await request.body()
        if len(body) > MAX_BODY:
            raise Refused(413, f"the body is larger than {MAX_BODY} bytes")
        return body

    def require_hub(request: Request) -> str:
        subscribed = home.subscribed()
        if subscribed is None:
            raise Refused(409, f"Edge {home.name} is not subscribed yet: the first EdgeSync is the bootstrap")
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
        push: Bootstrap = _parse(Bootstrap, await body_of(request))
        if not home.accept_bootstrap(push.secret, organization=push.organization, site=push.site, ca=push.ca,
                                     issued=push.issued):
            raise Refused(403, "the bootstrap secret is wrong or has expired, or this Edge is subscribed already: "
                               "run `mailyard edge subscribe` on the Edge and import the new file")
        trust_organization(ctx, str(home.node_cert().ca_path))
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
        settings = home.config()
        org = edge_organization(push, name=settings["name"], fqdn=settings["fqdn"], smtp=settings["smtp"],
                                 salt=settings["recipient_salt"])
        version = apply_org(r, org)
        r.hset(keys.EDGE_STATE, mapping={"config_at": time.time(), "config_version": version,
                                         "by": str(getattr(request.state, PEER, ""))})
        on_config()
        return {"edge": home.name, "version": version}

    @handler
    async def recipients(request: Request) -> dict[str, Any]:
        require_hub(request)
        push: RecipientsPush = _parse(RecipientsPush, await body_of(request))
        staging = keys.EDGE_RECIPIENTS + ":staging"
        pipe = r.pipeline(transaction=True)
        pipe.delete(staging)
        for i in range(0, len(push.hashes), CHUNK):
            pipe.sadd(staging, *push.hashes[i:i + CHUNK])
        if push.hashes:
            pipe.rename(staging, keys.EDGE_RECIPIENTS)
        else:
            pipe.delete(keys.EDGE_RECIPIENTS)
        pipe.hset(keys.EDGE_STATE, mapping={"recipients_at": time.time(), "recipients": len(set(push.hashes)),
                                            "by": str(getattr(request.state, PEER, ""))})
        pipe.execute()
        return {"edge": home.name, "recipients": len(set(push.hashes))}

    return Starlette(routes=[
        Route(BOOTSTRAP_PATH, bootstrap, methods=["POST"]),
        Route(CONFIG_PATH, config, methods=["POST"]),
        Route(RECIPIENTS_PATH, recipients, methods=["POST"]),
    ])
