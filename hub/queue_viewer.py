"""The Queue Viewer: a web page, its JSON API and the site's Prometheus metrics.

Exchange 2010's Queue Viewer, served by one small FastAPI app that reads and acts on the
site's Redis with the same functions as the CLI (``mailyard queue ...``, ``mailyard message
...``, ``mailyard track``), so the JSON here is exactly what their ``--json`` prints.

  GET  /                                  the page (hub/static/viewer.html)
  GET  /api/queues?server=&filter=&sort=  Get-Queue rows
  GET  /api/messages?queue=&filter=&sort=&limit=
                                          Get-Message rows, with each recipient's state
  POST /api/queues/actions                {"action": "suspend"|"resume"|"retry",
                                           "queues": [...] | "filter": "...", "resubmit": false}
  POST /api/messages/actions              {"action": "suspend"|"resume"|"remove",
                                           "identities": [...] | "filter": "...", "queue": "...",
                                           "ndr": true}
  GET  /api/messages/export?identity=     the RFC 5322 text of a suspended message
  GET  /api/track?message_id=&internal_id=&sender=&recipient=&event=&start=&end=&limit=
                                          the message tracking log
  GET  /api/hubs                          hub nodes and their heartbeats
  GET  /api/hubs/<name>                   one hub: its row, items in flight, its receive
                                          connectors with the SMTP sessions open on each
  GET  /api/connectors                    the organization's send and receive connectors
  GET  /api/flow?minutes=                 mail flow per minute, per site and next hop
                                          (received, delivered, deferred, failed, depth)
  GET  /api/shape?by=queue|domain|sender  queue shape (qshape): messages by age, per destination
  GET  /health                            200 while Redis answers
  GET  /metrics                           Prometheus text format (mailyard.hub.metrics)

Actions answer ``{"count", "done": [{identity, result}], "failed": [{identity, error}]}``
(200, even when some objects refused), or 409 with that and an ``error`` when nothing
could be done. Every other error is ``{"error": "..."}`` with a fitting 4xx status: 400 for
a bad filter (the text keeps the caret line under the bad part), a bad sort or a bad
parameter, 404 for an unknown queue, message or path, 405, 413 for a body over 1 MB, 415
for a POST that is not JSON, 503 while Redis cannot be reached.

With a token, every path but the page (``/`` and ``/static/...``) and ``/health`` needs
``Authorization: Bearer <token>``: the API under ``/api/``, reads too (they show every
sender, recipient and subject, and export gives whole messages), and ``/metrics``. Without
one: 401 (with ``WWW-Authenticate: Bearer``); with a wrong one: 403. A metrics token, if
given, opens ``/metrics`` only: a Prometheus scraper's, which then can neither read mail nor
act on it. The page, its files and ``/health`` stay open: they show no mail.
"""

from __future__ import annotations

import hmac
import threading
import time
from pathlib import Path
from typing import Any, Literal

import redis
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mailyard import redisconn, tracking
from mailyard.errors import MailyardError, NotFoundError, SiteError, StateError
from mailyard.filters import FilterError
from mailyard.hub import flow, hub_list, queue_shape
from mailyard.hub import queue_actions as actions
from mailyard.hub.metrics import CONTENT_TYPE, make_registry, render
from mailyard.hub.node import Node
from mailyard.hub.queue_rows import MAX_MESSAGES, SortError, message_rows, queue_rows

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY = 1024 * 1024
TOKEN_ENV = "MAILYARD_VIEWER_TOKEN"
DEFAULT_HEARTBEAT_TIMEOUT_S = 5.0
OPEN_PATHS = frozenset({"/", "/health"})  # and /static/...: what needs no token


class ApiError(Exception):
    def __init__(self, status: int, message: str, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra or {}


class QueueActionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["suspend", "resume", "retry"]
    queues: list[str] | None = None
    filter: str | None = None
    resubmit: bool = False


class MessageActionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["suspend", "resume", "remove"]
    identities: list[str] | None = None
    filter: str | None = None
    queue: str | None = None
    ndr: bool = True
    # For a message being delivered: wait up to this many seconds for the delivery to end
    # and report what became of the request (instead of PendingSuspend / PendingRemove).
    wait: float = Field(0.0, ge=0, le=60)


def _where(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(p) for p in loc) or "body"


def _iso(ms: int) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000)) if ms else None


def _time_ms(name: str, value: str | None) -> int | None:
    if not value:
        return None
    try:
        return tracking.parse_time(value)
    except ValueError as exc:
        raise ApiError(400, f"{name}: {exc}") from None


def _outcome(outcome: actions.ActionReport) -> JSONResponse:
    data = outcome.as_dict()
    if outcome.failed and not outcome.done:
        identity, error = outcome.failed[0]
        more = f" (and {len(outcome.failed) - 1} more)" if len(outcome.failed) > 1 else ""
        return JSONResponse({"error": f"{identity}: {error}{more}", **data}, status_code=409)
    return JSONResponse(data)


def create_app(redis_url: str, *, token: str | None = None, metrics_token: str | None = None,
               allowed_hosts: list[str] | None = None) -> FastAPI:
    """The Queue Viewer for the site whose Redis is at ``redis_url``.

    ``token``: the API (``/api/...``, reads and actions) and ``/metrics`` need
    ``Authorization: Bearer <token>``. ``metrics_token``: also accepted, for ``/metrics`` only
    (ignored without ``token``). ``allowed_hosts``: the only Host header names served (the CLI
    sets the loopback names when it listens on loopback, so a web page cannot reach the viewer
    through DNS rebinding)."""
    app = FastAPI(title="Mailyard Queue Viewer", docs_url=None, redoc_url=None, openapi_url=None)
    r = redisconn.connect(redis_url)
    metrics_registry = make_registry(r)
    token = token or None
    metrics_token = (metrics_token or None) if token else None
    state: dict[str, Node] = {}
    node_lock = threading.Lock()
    action_lock = threading.Lock()  # one action at a time: the Celery producer is shared

    def node() -> Node:
        with node_lock:
            if "node" not in state:
                state["node"] = actions.admin_node(redis_url, name="viewer")
            return state["node"]

    # region: errors

    def error(status: int, message: str, **extra: Any) -> JSONResponse:
        return JSONResponse({"error": message, **extra}, status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.message, **exc.extra)

    @app.exception_handler(FilterError)
    async def _bad_filter(_: Request, exc: FilterError) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(SortError)
    async def _bad_sort(_: Request, exc: SortError) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(NotFoundError)
    async def _not_found(_: Request, exc: NotFoundError) -> JSONResponse:
        return error(404, str(exc))

    @app.exception_handler(StateError)
    async def _refused(_: Request, exc: StateError) -> JSONResponse:
        return error(409, str(exc))

    @app.exception_handler(SiteError)
    async def _site(_: Request, exc: SiteError) -> JSONResponse:
        return error(503, str(exc))

    @app.exception_handler(MailyardError)
    async def _mailyard(_: Request, exc: MailyardError) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(redis.RedisError)
    async def _redis(_: Request, exc: redis.RedisError) -> JSONResponse:
        return error(503, f"Redis: {exc}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such path: {request.url.path}"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:  # a bug: JSON all the same (uvicorn logs it)
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        return error(400, f"{_where(first.get('loc', ()))}: {first.get('msg', 'invalid')}")

    hosts = {h.lower() for h in allowed_hosts} if allowed_hosts else None

    @app.middleware("http")
    async def _hosts_token_and_caching(request: Request, call_next: Any) -> Response:
        if hosts is not None:
            host = request.headers.get("host", "").lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in hosts:
                return error(400, f"this Queue Viewer does not answer to the host name {host!r}")
        path = request.url.path
        if path in OPEN_PATHS or path.startswith("/static/"):
            refused = None  # the page, its files and /health: no mail there
        else:  # the API, /metrics, and every other path (a 404 too) need the token
            refused = check_token(request, metrics=path == "/metrics")
        if refused is not None:
            refused.headers["Cache-Control"] = "no-store"
            return refused
        response = await call_next(request)
        if request.url.path.startswith("/api/") or request.url.path == "/metrics":
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    # endregion

    # region: requests

    def check_token(request: Request, *, metrics: bool = False) -> JSONResponse | None:
        """None when the request may go on; else the 401 or 403 to answer."""
        if token is None:
            return None
        given = request.headers.get("authorization", "")
        scheme, _, value = given.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            response = error(401, "this Queue Viewer needs its token (Authorization: Bearer <token>)")
            response.headers["WWW-Authenticate"] = 'Bearer realm="Mailyard Queue Viewer"'
            return response
        presented = value.strip().encode()
        # compare_digest with each, always both: the time taken says nothing about either token
        is_token = hmac.compare_digest(presented, token.encode())
        is_metrics = metrics_token is not None and hmac.compare_digest(presented, metrics_token.encode())
        if is_token or (metrics and is_metrics):
            return None
        if is_metrics:
            return error(403, "the metrics token opens /metrics only")
        return error(403, "wrong token")

    async def json_body(request: Request, model: type[BaseModel]) -> Any:
        """The request's JSON body as ``model``: 413 over 1 MB, 415 if not JSON, 400 if bad (the
        token was checked before: see the middleware)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY:
            raise ApiError(413, f"request body is larger than the limit of {MAX_BODY} bytes")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, f"send application/json, not {ctype or 'no content type'}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise ApiError(413, f"request body is larger than the limit of {MAX_BODY} bytes")
            chunks.append(chunk)
        # pydantic parses and checks at once, bounding the nesting (json.loads would recurse on
        # 100,000 "[" until RecursionError) and refusing lone surrogates Redis cannot encode.
        try:
            return model.model_validate_json(b"".join(chunks))
        except ValidationError as exc:
            first = exc.errors()[0]
            if first["type"] == "json_invalid":
                raise ApiError(400, f"body is not JSON: {first['msg'].removeprefix('Invalid JSON: ')}") from None
            raise ApiError(400, f"{_where(first.get('loc', ()))}: {first.get('msg', 'invalid')}") from None

    # endregion

    # region: page, health, metrics

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "viewer.html", media_type="text/html",
                            headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    def health() -> dict[str, Any]:
        r.ping()
        return {"status": "ok", "service": "queue viewer", "token_required": token is not None}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(render(metrics_registry), media_type=CONTENT_TYPE)

    # endregion

    # region: queues and messages

    @app.get("/api/queues")
    def queues(server: str | None = None, filter: str | None = None, sort: str | None = None) -> JSONResponse:
        return JSONResponse(queue_rows(r, server=server or None, filter=filter, sort=sort))

    @app.get("/api/messages")
    def messages(queue: str | None = None, filter: str | None = None, sort: str | None = None,
                 limit: int = Query(1000, ge=1, le=MAX_MESSAGES)) -> JSONResponse:
        rows = message_rows(r, queues=[queue] if queue else None, filter=filter, sort=sort, limit=limit)
        return JSONResponse(rows)

    @app.post("/api/queues/actions")
    async def queue_actions(request: Request) -> JSONResponse:
        body: QueueActionBody = await json_body(request, QueueActionBody)
        if bool(body.queues) == bool(body.filter and body.filter.strip()):
            raise ApiError(400, 'give "queues" (a list of identities) or "filter" (exactly one)')
        if body.resubmit and body.action != "retry":
            raise ApiError(400, 'resubmit: only with the "retry" action')

        def run() -> actions.ActionReport:
            targets = body.queues or [q["identity"] for q in queue_rows(r, filter=body.filter)]
            with action_lock:
                return actions.act_on_queues(node(), body.action, targets, resubmit=body.resubmit)

        return _outcome(await run_in_threadpool(run))

    @app.post("/api/messages/actions")
    async def message_actions(request: Request) -> JSONResponse:
        body: MessageActionBody = await json_body(request, MessageActionBody)
        if bool(body.identities) == bool(body.filter and body.filter.strip()):
            raise ApiError(400, 'give "identities" (a list) or "filter" (exactly one)')
        if body.queue and not body.filter:
            raise ApiError(400, 'queue: only with "filter"')
        if not body.ndr and body.action != "remove":
            raise ApiError(400, 'ndr: only with the "remove" action')

        def run() -> actions.ActionReport:
            targets = body.identities or [
                m["identity"] for m in message_rows(r, queues=[body.queue] if body.queue else None,
                                                    filter=body.filter, limit=MAX_MESSAGES)]
            with action_lock:
                report = actions.act_on_messages(node(), body.action, targets, ndr=body.ndr)
            return actions.await_requests(node(), report, body.wait)  # (other actions need not wait)

        return _outcome(await run_in_threadpool(run))

    @app.get("/api/messages/export")
    def export(identity: str) -> Response:
        item = actions.find_item(node(), identity)
        raw = actions.export_message(node(), item)
        name = f"{item.queue}\\{item.id}".replace("\\", "_").replace(" ", "_")
        return Response(raw, media_type="message/rfc822",
                        headers={"Content-Disposition": f'attachment; filename="{name}.eml"'})

    # endregion

    # region: tracking and hubs

    @app.get("/api/track")
    def track(message_id: str | None = None, internal_id: str | None = None, sender: str | None = None,
              recipient: str | None = None, event: str | None = None, start: str | None = None,
              end: str | None = None, limit: int = Query(1000, ge=1, le=100_000)) -> JSONResponse:
        if event and event.upper() not in {e.value for e in tracking.Event}:
            raise ApiError(400, f"event: {event!r} is not an event; use one of "
                                f"{', '.join(e.value for e in tracking.Event)}")
        records = tracking.search(
            r, message_id=message_id or None, internal_id=internal_id or None, sender=sender or None,
            recipient=recipient or None, event=event or None, start_ms=_time_ms("start", start),
            end_ms=_time_ms("end", end), limit=limit,
        )
        return JSONResponse([rec.as_dict() for rec in records])

    @app.get("/api/hubs")
    def hubs() -> JSONResponse:
        try:
            timeout_s = float(node().settings.hub_heartbeat_timeout)
        except MailyardError:
            timeout_s = DEFAULT_HEARTBEAT_TIMEOUT_S
        return JSONResponse(hub_list.hub_rows(r, timeout_s))

    @app.get("/api/hubs/{name}")
    def hub_page(name: str) -> JSONResponse:
        org = node().orgs.org
        return JSONResponse(hub_list.hub_detail(r, name, org, float(org.transport.hub_heartbeat_timeout)))

    @app.get("/api/connectors")
    def connectors() -> JSONResponse:
        return JSONResponse(hub_list.connector_rows(r, node().orgs.org))

    @app.get("/api/flow")
    def flow_series(minutes: int = Query(60, ge=1, le=flow.WINDOW_MINUTES)) -> JSONResponse:
        try:
            sites = [s.name for s in node().orgs.org.sites]
        except MailyardError:
            sites = []
        return JSONResponse(flow.read(r, int(time.time() * 1000), minutes, sites=sites).as_dict())

    @app.get("/api/shape")
    def shape(by: str = "queue") -> JSONResponse:
        if by not in queue_shape.BY:
            raise ApiError(400, f"by: one of {', '.join(queue_shape.BY)}, not {by!r}")
        rows = queue_shape.shape(r, by=by, now_ms=int(time.time() * 1000))
        return JSONResponse({"by": by, "columns": list(queue_shape.COLUMNS), "rows": [row.as_dict() for row in rows]})

    # endregion
    return app
