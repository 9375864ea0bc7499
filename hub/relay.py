"""Relay between sites: what the send connector of one hub and the receive connector of a hub
of another site agree on.

The sending hub logs on as ``exchange-server/<its name>`` with the organization's server
token, and marks each message with ``X-Mailyard-Origin: <its message id>``. The receiving hub
trusts that header only from a client logged on as an Exchange server (it takes a relay
repeated after a lost reply in once, by that id), and strips every organization header
before the message goes on, so none reaches a mailbox or the Internet.
"""

from __future__ import annotations

SERVER_LOGIN_PREFIX = "exchange-server"  # hubs log on to hubs as "exchange-server/<hub>"
ORIGIN_HEADER = "X-Mailyard-Origin"  # set by hubs relaying between sites; trusted from them only
ORG_HEADERS = (ORIGIN_HEADER,)  # the organization's own headers: removed from every message received


def server_login(hub: str) -> str:
    """The login a hub relays with: ``exchange-server/<hub>``."""
    return f"{SERVER_LOGIN_PREFIX}/{hub}"


def server_of(login: str) -> str | None:
    """The hub a server login names (``"hub"`` when it names none), or None for any other login."""
    if not login.lower().startswith(SERVER_LOGIN_PREFIX):
        return None
    return login.partition("/")[2] or "hub"
