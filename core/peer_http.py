"""HTTPS servers that know who the client is: uvicorn's h11 protocol with the identity of a
verified client certificate in each request's state (``PEER``), for the mailbox servers' API and
an Edge's EdgeSync listener.

uvicorn puts nothing of the peer certificate in the ASGI scope, so ``PeerH11`` reads it when the
connection is made (the TLS handshake is over then) and copies it into ``app_state``, which
uvicorn copies into each request's state.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

from mailyard import pki

PEER = "mailyard_peer"  # the request state key of the client's verified certificate identity
# The request state key of a dict the server shares with one connection: "abort" set there
# means the response refuses the request and the connection is cut once it is written.
CONNECTION = "mailyard_connection"


class PeerH11(H11Protocol):
    """uvicorn's h11 protocol, telling the app who the client's verified certificate names
    (uvicorn puts nothing of the peer certificate in the ASGI scope). The TLS handshake is
    over when ``connection_made`` runs; ``app_state`` is copied into each request's state."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        identity = pki.peer_identity(transport.get_extra_info("ssl_object"))
        shared: dict[str, bool] = {}
        self.app_state = {**self.app_state, PEER: identity, CONNECTION: shared}
        self._shared = shared
        super().connection_made(CutAfterRefusal(transport, shared))  # type: ignore[arg-type]

    # A TLS close waits for the client's close_notify, up to asyncio's 30 s, and a client that
    # holds an idle keep-alive connection open (the hubs' pools, an httpx client) never sends
    # one: an idle connection is cut instead, and so is every connection once SIGTERM came
    # (after its last response is written), or stopping would take those 30 s.

    def timeout_keep_alive_handler(self) -> None:
        self._shared["abort"] = True  # (nothing is in flight on an idle connection)
        super().timeout_keep_alive_handler()

    def shutdown(self) -> None:
        self._shared["abort"] = True
        if self.transport.is_closing():  # a TLS close already under way: cut it short
            self.transport.abort()
        super().shutdown()


class CutAfterRefusal:
    """The connection's transport, whose ``close`` after a refusal aborts instead of a TLS
    shutdown: asyncio's SSL transport would go on reading (and decrypting, and dropping)
    whatever the client sends until its close_notify or 30 s, gigabytes of a refused upload.
    The refusal is written first (as far as the kernel's buffer)."""

    def __init__(self, transport: asyncio.Transport, shared: dict[str, bool]) -> None:
        self._transport = transport
        self._shared = shared

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)

    def close(self) -> None:
        transport = self._transport
        if not self._shared.get("abort") or transport.is_closing():
            transport.close()
            return
        transport.pause_reading()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0

        def cut() -> None:
            if transport.get_write_buffer_size() and loop.time() < deadline:
                loop.call_later(0.01, cut)
                return
            transport.abort()

        cut()
