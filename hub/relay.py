"""Relay between sites: what the send connector of one hub and the receive connector of a hub
of another site agree on.

The sending hub proves who it is with its site's certificate of the organization (mutual TLS
after STARTTLS, verified against the organization's CA both ways: ``send._org_tls`` and
``receive_policy.certificate_logon``); it sends no AUTH and no secret. It marks each message
with ``X-Mailyard-Origin: <its message id>``, and mail of the organization's own (not mail
that came in from the Internet: ``records.Message.from_organization``) with
``X-Mailyard-Internal: 1``. The receiving hub (or Edge) trusts those headers only from a client
its certificate made an Exchange server (it takes a relay repeated after a lost reply in once, by
that id; an Edge DKIM-signs only internal mail), and strips every organization header before the
message goes on, so none reaches a mailbox or the Internet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mailyard.hub.receive_policy import Identity

ORIGIN_HEADER = "X-Mailyard-Origin"  # set by hubs relaying between sites; trusted from them only
INTERNAL_HEADER = "X-Mailyard-Internal"  # set with it on the organization's own mail; trusted alike
ORG_HEADERS = (ORIGIN_HEADER, INTERNAL_HEADER)  # the organization's own headers: removed from all mail received


def from_organization(identity: Identity | None, internal_header: str | None) -> bool:
    """Whether a message received from a client of ``identity`` (None: anonymous) is the
    organization's own: a logged-on user's, or what a node of the organization (by its
    certificate) relays and marks so. Never anonymous mail, nor an appliance's
    (ExternalAuthoritative), whatever headers it carries."""
    if identity is None:
        return False
    return identity.kind == "user" or (identity.organization_node and internal_header is not None
                                       and str(internal_header).strip() == "1")
