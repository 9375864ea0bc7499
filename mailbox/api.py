"""The mailbox server's HTTP API.

It is served over TLS only, with the server's certificate from the organization's CA.

For clients (what Outlook does over MAPI in Exchange), who log on with HTTP Basic as a
mailbox (its address and password) or an operator (its name and password):
  POST /mailboxes/{address}/outbox                 "Send": a message into the Outbox (once per
                                                   Message-ID within the duplicate detection
                                                   window: a retried request is no new mail);
                                                   needs SendAs or SendOnBehalf on the mailbox
  GET  /mailboxes/{address}/folders/{folder}        list a folder        } need FullAccess
  GET  /mailboxes/{address}/folders/{folder}/{id}   one message          } on the mailbox
A mailbox holds every right on itself; the organization file grants others (a mailbox's
``full_access``, ``send_as``, ``send_on_behalf``; an operator's ``rights``).
For hubs of this server's site, who present their client certificate (mutual TLS):
  POST /hub/outbox/take                             take up to N waiting Outbox items (oldest
                                                   first), held for the hub for a while
  POST /hub/outbox/submitted                        pickup acknowledged: move them to Sent Items
  POST /hub/deliver                                 deliver a batch to local mailboxes (once per
                                                   message id, and per Message-ID in the window)
No browser can forge a request: state changes take only ``application/json`` or
``message/rfc822`` bodies (never a "simple" cross-origin POST) and an ``Authorization``
header, and a request whose ``Host`` does not name this server is refused (DNS rebinding).
Every error is JSON ``{"error": "..."}`` with a 4xx status that fits; 401 (with
``WWW-Authenticate``) when the logon is missing or wrong, 403 when it may not.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
from collections.abc import Callable
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.policy import SMTP as SMTP_POLICY
from email.policy import SMTPUTF8 as SMTPUTF8_POLICY
from email.utils import formatdate, make_msgid
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from mailyard import durability, lockout, mime, passwords, pki
from mailyard import headers as mail_headers
from mailyard.addresses import canonical
from mailyard.directory import Directory, Principal
from mailyard.durability import Unreplicated
from mailyard.errors import NotFoundError
from mailyard.mailbox.compose import plain_message
from mailyard.mailbox.outbox import OutboxIndex
from mailyard.mailbox.store import MailboxStore, folder_name
from mailyard.org import normalize_address

log = logging.getLogger("mailyard.mailbox.api")

MAX_DELIVER_BATCH = 1000
MAX_TAKE = 1000  # Outbox items a hub takes, or acknowledges, per request
MAX_SEND_BATCH = 100  # messages a client sends in one request (Graph's JSON batching takes 20)


HOST_HEADER = re.compile(r"(\[[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*\]|[^\[\]:]+)(?::[0-9]{1,5})?")
from mailyard.peer_http import CONNECTION, PEER  # noqa: E402 (the request state keys, re-exported)


def _cut_after_response(request: Request) -> None:
    _cut_connection(request.scope)


def _cut_connection(scope: Scope) -> None:
    conn = scope.get("state", {}).get(CONNECTION)
    if isinstance(conn, dict):
        conn["abort"] = True


class _HostCheck:
    """Refuses a request whose ``Host`` does not name this server (DNS rebinding). Plain ASGI:
    Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``) runs each request in a task
    group of its own with memory streams, measured at a sixth of the server's CPU per Send."""

    def __init__(self, app: ASGIApp, *, server: str, hosts: frozenset[str]) -> None:
        self.app = app
        self.server = server
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host", "")
            # host[:port], an IPv6 literal in brackets: anything else names no server
            shape = HOST_HEADER.fullmatch(host)
            if shape is None or shape.group(1).strip("[]").lower() not in self.hosts:
                _cut_connection(scope)
                refusal = JSONResponse({"error": f"Host {host!r} does not name this server ({self.server})"},
                                       status_code=421, headers={"Connection": "close"})
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)
SEND_TYPES = ("application/json", "message/rfc822")
SCRYPT_AT_ONCE = 4  # password verifications at a time (each 16 MiB of memory)
LOGON_WAIT = 5.0  # seconds a logon waits for one before 503


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.message = message
        self.headers = headers


def create_app(
    *,
    server: str,
    site: str,
    hosts: frozenset[str],
    store: MailboxStore,
    directory: Callable[[], Directory],
    r: redis.Redis,
    outbox: OutboxIndex,
    on_submitted: Callable[[str, list[str]], Unreplicated | None],
    on_acknowledged: Callable[[list[tuple[str, str]]], None],
    fault: Callable[[str], None] = lambda name: None,
) -> FastAPI:
    """The API of mailbox server ``server`` of ``site``; ``hosts``: the names a request's
    ``Host`` may give (what the server listens on and is advertised as, and its identity)."""
    app = FastAPI(title=f"Mailyard mailbox server {server}", docs_url=None, redoc_url=None)
    realm = f'Basic realm="Mailyard {server}", charset="UTF-8"'
    hub_identity = pki.Identity.hub(site)
    scrypt_slots = threading.BoundedSemaphore(SCRYPT_AT_ONCE)
    unconfirmed: set[tuple[str, str]] = set()  # Outbox items answered 503: no replica had their registration

    app.add_middleware(_HostCheck, server=server, hosts=hosts)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        # A body too large, or sent without a valid logon, is refused unread: close the
        # connection, or the HTTP server would go on reading (and dropping) the rest of it.
        headers = dict(exc.headers or {})
        if exc.status in (401, 403, 413, 415):
            headers["Connection"] = "close"
            _cut_after_response(request)
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers or None)

    @app.exception_handler(NotFoundError)
    async def _not_found(_: Request, exc: NotFoundError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=404)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such path: {request.url.path}"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        return JSONResponse({"error": detail}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

    def mailbox_here(address: str) -> str:
        try:
            address = normalize_address(address)
        except ValueError:
            raise ApiError(404, f"no mailbox {address!r} on {server}") from None
        entry = directory().mailbox_entry(address)
        if entry is None or entry.server != server:
            raise ApiError(404, f"no mailbox {address} on {server}")
        store.ensure(entry.address)  # (a mailbox the organization gained since the start)
        return entry.address

    def require_hub(request: Request) -> None:
        """The hub API: a hub of this site, proven by its client certificate (mutual TLS)."""
        peer = getattr(request.state, PEER, None)
        if peer is None:
            raise ApiError(401, f"the hub API needs the client certificate of a hub of site {site}")
        if not pki.matches(peer, hub_identity):
            raise ApiError(403, f"the certificate of {peer} may not use the hub API of {server} "
                                f"(only hubs of site {site})")

    def logon(request: Request) -> Principal:
        """The client's HTTP Basic logon (in a worker thread: scrypt is slow on purpose)."""
        found, password = credentials(request)
        return known_logon(found, password) or verify_logon(found, password, client_of(request))

    async def logon_async(request: Request) -> Principal:
        """``logon`` from the event loop: a logon verified before (an HMAC) is checked here, only
        an scrypt goes to a worker thread (a hop costs more CPU than the HMAC)."""
        found, password = credentials(request)
        return known_logon(found, password) or await _in_thread(verify_logon, found, password, client_of(request))

    def client_of(request: Request) -> str:
        return request.client.host if request.client else "?"

    def credentials(request: Request) -> tuple[tuple[Principal, str] | None, str]:
        """(the principal the Basic logon names and its password hash, or None; the password)."""
        given = request.headers.get("authorization", "")
        scheme, _, encoded = given.partition(" ")
        if scheme.lower() != "basic" or not encoded:
            raise ApiError(401, "log on with HTTP Basic: a mailbox address or operator name, and its password",
                           {"WWW-Authenticate": realm})
        try:
            login, sep, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError):
            raise ApiError(401, "the Authorization header is not valid Basic credentials",
                           {"WWW-Authenticate": realm}) from None
        return (directory().principal(login.strip()) if sep else None), password

    def known_logon(found: tuple[Principal, str] | None, password: str) -> Principal | None:
        return found[0] if found is not None and passwords.verified_before(password, found[1]) else None

    def verify_logon(found: tuple[Principal, str] | None, password: str, client: str) -> Principal:
        # Each other logon costs an scrypt (16 MiB, tens of ms): a few at a time, so that a flood
        # of guesses cannot take every thread and the memory with them. A password not known to
        # be right counts against the lockouts SMTP AUTH counts against too (mailyard.lockout).
        if not scrypt_slots.acquire(timeout=LOGON_WAIT):
            raise ApiError(503, "too many logons at once; try again in a moment", {"Retry-After": "1"})
        try:
            def verify() -> bool:
                if found is None:
                    passwords.verify_nothing(password)
                    return False
                return passwords.verify(password, found[1])

            settings = directory().org.transport
            account = None if found is None else str(found[0])
            verdict = lockout.check(r, settings, lockout.source_of(client), account, verify,
                                    lockout.Where("HTTP", server, client, account or ""))
        finally:
            scrypt_slots.release()
        if verdict == "locked":
            raise ApiError(429, "too many failed logons; try again later",
                           {"Retry-After": str(int(settings.logon_lockout_duration))})
        if verdict == "unavailable":
            raise ApiError(503, "logons cannot be checked right now; try again in a moment", {"Retry-After": "1"})
        if verdict != "ok" or found is None:
            raise ApiError(401, "logon failed: unknown user or wrong password", {"WWW-Authenticate": realm})
        return found[0]

    def require_right(who: Principal, rights: tuple[str, ...], owner: str, doing: str) -> None:
        d = directory()
        if not any(d.may(who, right, owner) for right in rights):
            raise ApiError(403, f"{who} may not {doing} {owner} (needs {' or '.join(rights)})")

    async def json_object(request: Request, limit: int) -> dict[str, Any]:
        """The hub API's request body: a JSON object of at most ``limit`` bytes."""
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise ApiError(415, "the hub API takes application/json")
        data = parse_json(await read_body(request, limit))
        if not isinstance(data, dict):
            raise ApiError(400, "expected a JSON object")
        return data

    async def read_body(request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body is larger than the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is larger than the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.get("/health")
    def health() -> dict[str, Any]:
        mailboxes = [m.address for m in directory().org.mailboxes if m.server == server]
        return {"server": server, "mailboxes": len(mailboxes)}

    # region: client API

    @app.post("/mailboxes/{address}/outbox", status_code=202)
    async def send(address: str, request: Request) -> dict[str, Any]:
        who = await logon_async(request)
        owner = mailbox_here(address)
        require_right(who, ("SendAs", "SendOnBehalf"), owner, "send from")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in SEND_TYPES:
            # (text/plain, a form, or none: what a page of another site can POST without asking)
            raise ApiError(415, f"send message/rfc822 or application/json, not {ctype or 'no Content-Type'}")
        limit = directory().org.transport.max_message_size
        body = await read_body(request, limit + 64 * 1024)
        raw = compose(parse_json(body), owner) if ctype == "application/json" else body
        raw, message_id, recipients = prepare_outgoing(raw, owner, directory(), who)
        if len(raw) > limit:
            raise ApiError(413, f"message is {len(raw)} bytes; the limit is {limit}")
        # One worker thread for the write and the registration: on_submitted talks to Redis,
        # which must not hold up the event loop (and every other request) meanwhile.
        [(item_id, fresh)] = await _in_thread(_submit, owner, [(message_id, raw)])
        return {"id": item_id, "message_id": message_id, "recipients": recipients, "duplicate": not fresh}

    @app.post("/mailboxes/{address}/outbox/batch")
    async def send_batch(address: str, request: Request) -> dict[str, Any]:
        """Several "Send"s in one request, as Microsoft Graph's JSON batching answers them: 200
        with a result per message, in order, each with the status its own Send would have had."""
        who = await logon_async(request)
        owner = mailbox_here(address)
        require_right(who, ("SendAs", "SendOnBehalf"), owner, "send from")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, f"send application/json, not {ctype or 'no Content-Type'}")
        limit = directory().org.transport.max_message_size
        data = parse_json(await read_body(request, limit + 64 * 1024))  # (the whole batch: one message's size)
        if not isinstance(data, dict) or set(data) != {"messages"} or not isinstance(data["messages"], list):
            raise ApiError(400, 'expected {"messages": [...]}, each message as a single Send takes it')
        if not 1 <= len(data["messages"]) <= MAX_SEND_BATCH:
            raise ApiError(400, f"messages: from 1 to {MAX_SEND_BATCH} in one batch")
        # Building a message with long address lines costs the email package tens of ms: the
        # batch is bounded in recipients, and built off the event loop
        envelope = directory().org.transport.max_recipient_envelope_limit
        if _recipient_count(data["messages"]) > envelope:
            raise ApiError(400, f"the batch has more than {envelope} recipients in all (max_recipient_envelope_limit)")
        results, ready = await _in_thread(_prepare_batch, data["messages"], owner, who, limit)
        if ready:
            stored = await _in_thread(_submit, owner, [(message_id, raw) for _, message_id, raw, _ in ready], True)
            for (n, message_id, _, recipients), outcome in zip(ready, stored, strict=True):
                results[n] = outcome if isinstance(outcome, dict) else {
                    "status": 202, "id": outcome[0], "message_id": message_id, "recipients": recipients,
                    "duplicate": not outcome[1]}
        return {"results": results}

    def _prepare_batch(entries: list[Any], owner: str, who: Principal, limit: int
                       ) -> tuple[list[dict[str, Any]], list[tuple[int, str, bytes, list[str]]]]:
        """Each entry built and checked as a single Send is: (a result per entry, the error ones
        filled in; the good ones as (position, Message-ID, message, recipients))."""
        results: list[dict[str, Any]] = []
        ready: list[tuple[int, str, bytes, list[str]]] = []
        for n, entry in enumerate(entries):
            try:
                raw, message_id, recipients = prepare_outgoing(compose(entry, owner), owner, directory(), who)
                if len(raw) > limit:
                    raise ApiError(413, f"message is {len(raw)} bytes; the limit is {limit}")
            except ApiError as exc:
                results.append({"status": exc.status, "error": exc.message})
                continue
            results.append({})
            ready.append((n, message_id, raw, recipients))
        return results, ready

    def _submit(owner: str, messages: list[tuple[str, bytes]], partial: bool = False
                ) -> list[tuple[str, bool] | dict[str, Any]]:
        """Store the messages in the Outbox (once per Message-ID) and register the new ones. A
        message the disk refused is an ApiError 503, or with ``partial`` its result in place."""
        out: list[tuple[str, bool] | dict[str, Any]] = []
        fresh: list[str] = []
        for (message_id, _), stored in zip(messages, store.submit_many(owner, messages), strict=True):
            if isinstance(stored, OSError):  # (EIO, ENOSPC): nothing new is in the Outbox, or it is there once
                log.error("submission of %s from %s failed: %s", message_id, owner, stored)
                refused = ApiError(503, f"the Outbox of {owner} cannot be written now ({stored.strerror}); send "
                                        "again with the same Message-ID, it is stored once", {"Retry-After": "5"})
                if not partial:
                    raise refused
                out.append({"status": 503, "error": refused.message})
                continue
            out.append(stored)
            item_id, new = stored
            # A copy from a Send answered 503 (its directory fsync failed after the rename) is
            # in the Outbox but was never registered: the retry that finds it registers it; so
            # does the retry of one whose registration no replica confirmed (answered 503 too)
            if new or (owner, item_id) in unconfirmed or (
                    (owner, item_id) not in outbox and store.has(owner, "Outbox", item_id)):
                fresh.append(item_id)
        fault("mailbox.outbox.stored")  # tests: die between the durable write and the notification
        for item_id in fresh:
            outbox.add(owner, item_id)
        why = on_submitted(owner, fresh)
        if why is None:
            unconfirmed.difference_update((owner, item_id) for item_id in fresh)
            return out
        # Transport durability "replica": the Outbox has it (and it goes out all the same once
        # Redis takes writes again), but no replica has its registration: not acknowledged.
        unconfirmed.update((owner, item_id) for item_id in fresh)
        log.warning("submission from %s not acknowledged: %s", owner, why.reason)
        error = ApiError(503, f"not accepted yet: {why.reason}; send again with the same Message-ID, it is "
                              "stored once", {"Retry-After": str(durability.RETRY_AFTER_S)})
        if not partial:
            raise error
        return [{"status": 503, "error": error.message} if isinstance(o, tuple) and o[0] in fresh else o
                for o in out]

    @app.get("/mailboxes/{address}/folders/{folder}")
    def list_folder(address: str, folder: str, request: Request) -> dict[str, Any]:
        who = logon(request)
        owner = mailbox_here(address)
        require_right(who, ("FullAccess",), owner, "read")
        items = store.list(owner, folder_name(folder))
        return {"mailbox": owner, "folder": folder_name(folder), "items": [i.as_dict() for i in items]}

    @app.get("/mailboxes/{address}/folders/{folder}/{item_id}")
    def read_item(address: str, folder: str, item_id: str, request: Request) -> Response:
        who = logon(request)
        owner = mailbox_here(address)
        require_right(who, ("FullAccess",), owner, "read")
        return Response(store.read(owner, folder_name(folder), item_id), media_type="message/rfc822")

    # endregion

    # region: hub API (store driver)

    @app.post("/hub/outbox/take")
    async def take_outbox(request: Request) -> dict[str, Any]:
        require_hub(request)
        data = await json_object(request, 4096)
        limit = data.get("limit")
        if type(limit) is not int or not 1 <= limit <= MAX_TAKE:
            raise ApiError(400, f"limit: expected an integer from 1 to {MAX_TAKE}")
        # Held for half the time after which the submission service kicks another hub: by
        # then a hub that died holding them has let them go.
        lease = directory().org.transport.submission_ack_timeout / 2
        return {"items": await _in_thread(_take, limit, lease)}

    def _take(limit: int, lease: float) -> list[dict[str, str]]:
        out = []
        for mailbox, item in outbox.take(limit, lease):
            try:
                raw = store.read(mailbox, "Outbox", item)
            except NotFoundError:  # left meanwhile (another hub's acknowledgement)
                outbox.remove(mailbox, item)
                continue
            out.append({"mailbox": mailbox, "id": item, "raw": base64.b64encode(raw).decode()})
        return out

    @app.post("/hub/outbox/submitted")
    async def submitted(request: Request) -> dict[str, Any]:
        require_hub(request)
        data = await json_object(request, 256 * 1024)
        items = data.get("items")
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_TAKE:
            raise ApiError(400, f"items: expected a list of 1 to {MAX_TAKE} items")
        refs = []
        for i, entry in enumerate(items):
            if not (isinstance(entry, dict) and isinstance(entry.get("mailbox"), str)
                    and isinstance(entry.get("id"), str)):
                raise ApiError(400, f"items[{i}]: expected {{\"mailbox\": ..., \"id\": ...}}")
            refs.append((mailbox_here(entry["mailbox"]), entry["id"]))
        return {"results": await _in_thread(_acknowledge, refs)}

    def _acknowledge(refs: list[tuple[str, str]]) -> list[dict[str, str]]:
        moved = set(store.move_many(refs, "Outbox", "Sent Items"))
        results = []
        for mailbox, item in refs:
            outbox.remove(mailbox, item)
            unconfirmed.discard((mailbox, item))
            if (mailbox, item) in moved:
                state = "moved"
            else:  # acknowledged before, or gone: either way nothing waits for a hub any more
                state = "sent" if store.has(mailbox, "Sent Items", item) else "gone"
            results.append({"mailbox": mailbox, "id": item, "state": state})
        try:
            on_acknowledged(refs)
        except redis.RedisError as exc:
            # Moved here, but still registered as waiting for a hub: the hub acknowledges again
            # (its next pickup), which finds them moved and ends the registration.
            why = durability.unreplicated(exc)
            raise ApiError(503, f"moved to Sent Items, but the submission registry cannot be written now "
                                f"({why.reason if why else exc}); acknowledge again",
                           {"Retry-After": str(durability.RETRY_AFTER_S)}) from exc
        return results

    @app.post("/hub/deliver")
    async def deliver(request: Request) -> dict[str, Any]:
        require_hub(request)
        org = directory().org
        data = await json_object(request, org.transport.max_message_size * 2 * min(org.transport.batch_size, 64)
                                 + 65536)
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages: expected a non-empty list")
        if len(messages) > MAX_DELIVER_BATCH:
            raise ApiError(413, f"messages: at most {MAX_DELIVER_BATCH} per request")
        hub = request.headers.get("x-mailyard-hub", "hub")
        work = [_check_delivery(i, m) for i, m in enumerate(messages)]
        results = await _in_thread(_deliver_all, work, hub)
        fault("mailbox.deliver.stored")  # tests: die after storing, before the hub hears of it
        return {"results": results}

    def _deliver_all(work: list[tuple[str, list[str], bytes]], hub: str) -> list[dict[str, Any]]:
        results: list[dict[str, Any] | None] = []
        batch: list[tuple[str, str, bytes]] = []  # (mailbox, key, message) for the store, at once
        slots: list[tuple[int, str, str]] = []  # (where its result goes, key, recipient as given)
        d = directory()
        for key, recipients, raw in work:
            for rcpt in recipients:
                entry = d.mailbox_entry(rcpt)
                if entry is None or entry.server != server:
                    results.append(_result(key, rcpt, 550, "5.1.1",
                                           f"STOREDRV.Deliver: no mailbox {rcpt} on {server}"))
                    continue
                slots.append((len(results), key, rcpt))
                results.append(None)
                batch.append((entry.address, key, _received(hub, server, key, entry.address) + raw))
        # One directory fsync per Inbox for the whole batch; each file still fsynced on its own.
        for (at, key, rcpt), stored in zip(slots, store.deliver_many(batch), strict=True):
            if isinstance(stored, OSError):
                log.error("delivery of %s to %s failed: %s", key, rcpt, stored)
                results[at] = _result(key, rcpt, 451, "4.3.2", f"STOREDRV.Deliver: {stored.strerror}")
                continue
            text = "STOREDRV.Deliver: delivered" if stored[1] else "STOREDRV.Deliver: duplicate, stored once"
            results[at] = _result(key, rcpt, 250, "2.0.0", text)
        return [r for r in results if r is not None]

    # endregion
    return app


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await run_in_threadpool(fn, *args)


def _recipient_count(entries: list[Any]) -> int:
    return sum(len(v) if isinstance(v, list) else 1 for e in entries if isinstance(e, dict)
               for f in ("to", "cc", "bcc") if (v := e.get(f)) is not None)


def _result(key: str, rcpt: str, code: int, status: str, text: str) -> dict[str, Any]:
    return {"id": key, "recipient": rcpt, "code": code, "status": status, "text": text}


def _check_delivery(index: int, m: object) -> tuple[str, list[str], bytes]:
    if not isinstance(m, dict):
        raise ApiError(400, f"messages[{index}]: expected an object")
    key, recipients, raw = m.get("id"), m.get("recipients"), m.get("raw")
    if not isinstance(key, str) or not key.isascii() or not key.replace("-", "").replace("_", "").isalnum() \
            or len(key) > 64:
        raise ApiError(400, f"messages[{index}].id: expected a message id of letters and digits")
    if not isinstance(recipients, list) or not recipients or not all(isinstance(r, str) for r in recipients):
        raise ApiError(400, f"messages[{index}].recipients: expected a non-empty list of addresses")
    if not isinstance(raw, str):
        raise ApiError(400, f"messages[{index}].raw: expected the message in base64")
    try:
        body = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"messages[{index}].raw: not valid base64") from None
    return key, [r.lower() for r in recipients], body


def _received(hub: str, server: str, key: str, rcpt: str) -> bytes:
    return (
        f"Received: from {hub} by {server} (Mailyard mailbox server) with MAPI id {key}"
        f" for <{rcpt}>; {formatdate(localtime=False)}\r\n"
    ).encode()


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise ApiError(400, f"body is not JSON: {exc}") from None


def compose_from_json(body: bytes, owner: str) -> bytes:
    """Build a message from ``{"to": [...], "cc": [...], "bcc": [...], "subject", "body"}``."""
    return compose(parse_json(body), owner)


def compose(data: Any, owner: str) -> bytes:
    """``compose_from_json`` for the JSON already parsed."""
    if not isinstance(data, dict):
        raise ApiError(400, "expected a JSON object with to, cc, bcc, subject and body")
    unknown = set(data) - {"to", "cc", "bcc", "subject", "body", "message_id"}
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(sorted(unknown))}")
    recipients: dict[str, list[str]] = {}
    for field in ("to", "cc", "bcc"):
        value = data.get(field, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ApiError(400, f"{field}: expected a list of addresses")
        if any("=?" in v for v in value):  # the email package would decode it into other addresses
            raise ApiError(400, f"{field}: an address may not hold an encoded word (=?...?=, RFC 2047 5); "
                                "give a display name as plain text")
        recipients[field.capitalize()] = value
    subject, text = data.get("subject", ""), data.get("body", "")
    if not isinstance(subject, str) or not isinstance(text, str):
        raise ApiError(400, "subject and body must be strings")
    message_id = data.get("message_id")
    if message_id is not None and (not isinstance(message_id, str) or not message_id.startswith("<")
                                   or not message_id.endswith(">")):
        raise ApiError(400, "message_id: expected <unique@domain>")
    if (plain := plain_message(owner, recipients, subject, message_id, text)) is not None:
        return plain
    msg = EmailMessage()
    try:
        msg["From"] = owner
        for name, addresses in recipients.items():
            if addresses:
                msg[name] = ", ".join(addresses)
        msg["Subject"] = subject
        if message_id is not None:
            msg["Message-ID"] = message_id
        msg.set_content(text)
        # An address that is not ASCII cannot be an encoded word (RFC 2047 5): such a message is
        # an SMTPUTF8 one, with UTF-8 headers (RFC 6532)
        ascii_only = owner.isascii() and all(a.isascii() for v in recipients.values() for a in v)
        return msg.as_bytes(policy=SMTP_POLICY if ascii_only else SMTPUTF8_POLICY)
    except Exception as exc:  # the email package refuses a value (a line break in a header, a lone
        # surrogate) or trips over it: the client's mistake, not the server's
        raise ApiError(400, f"the message cannot be built: {exc}") from None


def _addresses(head: Message, field: str) -> list[tuple[str, str]]:
    try:
        return mail_headers.addresses(head, field)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None


def prepare_outgoing(raw: bytes, owner: str, directory: Directory,
                     who: Principal | None = None) -> tuple[bytes, str, list[str]]:
    """Check a message a client sends from ``owner``'s mailbox, logged on as ``who`` (the owner
    when None), and add what a mail client would (Date, Message-ID, Sender).

    Every ``From`` address must be one of the mailbox's own. Sending for the mailbox with
    SendOnBehalf only (not SendAs), the message says so: ``Sender`` is the one logged on."""
    who = who or Principal("mailbox", owner)
    if not raw.strip():
        raise ApiError(400, "the message is empty")
    head_end = raw.find(b"\r\n\r\n")
    if head_end < 0:
        head_end = raw.find(b"\n\n")
    head = raw if head_end < 0 else raw[:head_end]
    # Every line of the header section is a field (name: value) or folds the one before.
    if bad := mail_headers.malformed_line(head):
        raise ApiError(400, f"header line {bad[0]} is not a header field (name: value): {bad[1]!r}")
    try:
        headers = BytesParser().parsebytes(head + b"\r\n\r\n", headersonly=True)
    except Exception:
        raise ApiError(400, "the message headers cannot be parsed") from None
    if headers.defects and not headers.keys():
        raise ApiError(400, "the message has no headers")
    own = directory.addresses_of(owner)
    if problem := mime.long_header_line(mime.normalize_line_ends(raw)):  # the rule of SMTP's DATA
        raise ApiError(400, f"{problem}: fold it (RFC 5322 2.2.3)")
    senders = [canonical(a) for _, a in _addresses(headers, "From")]
    for address in senders:
        if address not in own:
            raise ApiError(403, f"{who} may not send as {address or '(an empty From)'} from the mailbox {owner}")
    on_behalf = who.name != owner and not directory.may(who, "SendAs", owner)
    sender_field = [canonical(a) for _, a in _addresses(headers, "Sender")]
    if on_behalf and sender_field and sender_field != [who.name]:
        raise ApiError(403, f"{who} sends on behalf of {owner}: Sender must be {who.name}")
    if len(senders) > 1 and not sender_field and not on_behalf:
        raise ApiError(400, "a message with several From addresses needs a Sender (RFC 5322 3.6.2)")
    # Who may send as whom: the rule SMTP submission applies too (core/directory.py); with
    # SendOnBehalf only, the Sender this adds below is who sent it.
    refusal = directory.send_as_refusal(who, senders or [owner], sender_field or ([who.name] if on_behalf else []))
    if refusal:
        raise ApiError(403, refusal)
    recipients = []
    for field in ("To", "Cc", "Bcc"):
        for name, addr in _addresses(headers, field):
            try:
                recipients.append(normalize_address(addr))
            except ValueError:
                raise ApiError(400, f"{field}: {addr or name!r} is not a valid e-mail address") from None
    if not recipients:
        raise ApiError(400, "the message has no recipients (To, Cc or Bcc)")
    extra = b""
    if not senders:
        extra += f"From: {owner}\r\n".encode()
    if on_behalf and not sender_field:
        extra += f"Sender: {who.name}\r\n".encode()
    if headers.get("Date") is None:
        extra += f"Date: {formatdate(localtime=False)}\r\n".encode()
    message_id = str(headers.get("Message-ID", "")).strip()
    if not message_id:
        message_id = make_msgid(domain=owner.rpartition("@")[2])
        extra += f"Message-ID: {message_id}\r\n".encode()
    return extra + raw, message_id, recipients
