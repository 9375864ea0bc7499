"""Relay between sites: what the send connector of one hub and the receive connector of a hub
of another site agree on.

The sending hub proves who it is with its site's certificate of the organization (mutual TLS
after STARTTLS, verified against the organization's CA both ways: ``send._org_tls`` and
``receive_policy.certificate_logon``); it sends no AUTH and no secret. It marks each message
with ``X-Mailyard-Origin: <its message id>``. The receiving hub trusts that header only from a
client its certificate made an Exchange server (it takes a relay repeated after a lost reply in
once, by that id), and strips every organization header before the message goes on, so none
reaches a mailbox or the Internet.
"""

from __future__ import annotations

ORIGIN_HEADER = "X-Mailyard-Origin"  # set by hubs relaying between sites; trusted from them only
ORG_HEADERS = (ORIGIN_HEADER,)  # the organization's own headers: removed from every message received
