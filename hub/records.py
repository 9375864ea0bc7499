"""The records of queued mail, and the names of their stored fields, in one place.

A *message* (``my:msg:<id>``) is the envelope and summary of one piece of mail, stored once
with its body (``my:body:<id>``). An *item* (``my:item:<id>``) is that message in one queue
for some of its recipients: the categorizer splits a message into one item per next hop
(bifurcation), and every item holds a reference on the message (``refs``), so the last item
to leave deletes message and body. A *recipient* is one address of an item, with its own
delivery state. mailyard.keys lists the keys; this module lists their fields.

Message fields (``my:msg:<id>``, a hash; empty values are not stored)
  sender        envelope MAIL FROM; "" is the null sender <>
  message_id    the Message-ID header
  subject       the Subject header, at most 500 characters
  size          bytes as submitted (the limits apply to that: Exchange's OriginalSize)
  received      ms since the epoch
  expires       ms since the epoch; past it the message is expired with an NDR (4.4.7)
  source        STOREDRIVER, SMTP or DSN
  origin        the Outbox item reference, the SMTP client, or the reported message's id
  site, hub     where it was accepted
  client        the mailbox server or SMTP client it came from
  dsn           "" for ordinary mail; "ndr" or "delay" for reports Mailyard generated
  smtputf8      "1": an SMTPUTF8 message (RFC 6531: MAIL FROM had the parameter, or a
                mailbox submitted it with non-ASCII addresses or header text)
  internal      "1": received over SMTP as the organization's own mail (a logged-on user's,
                or relayed by a node of the organization that marked it so: mailyard.hub.relay);
                with source STOREDRIVER or DSN it is so without the field (``from_organization``)
  refs          how many items hold the message (integer)
  delay_dsn_sent  ms when its delay DSN was queued (at most one per message)

Item fields (``my:item:<id>``, a hash)
  msg           the message id
  queue         the identity of the queue it is in
  rcpts         its recipients, JSON (see ``Recipient``)
  status        an ``ItemStatus``
  enqueued      ms when it entered its queue
  retries       delivery attempts that failed so far
  next_retry    ms of its own next retry (status Retry)
  last_error    the last SMTP reply or error, with enhanced status code
  crashes       worker crashes while it was held (poison detection)
  suspect       "1": it was in a batch whose worker crashed; it is taken alone from then on
  from_queue    the queue it came from, for an item in Poison
  lease         the token of the worker holding it (status Active)
  hub, pid      the hub and the worker process holding it
  leased        ms when the lease was taken
  pending       a ``PendingAction`` an operator asked for while it was Active
  remove_ndr    "0" or "1": whether a PendingRemove sends the NDR

Queue fields (``my:queue:<identity>``, a hash)
  identity, site, next_hop, connector
  kind          a ``QueueKind``: what the queue is for (never read off its identity)
  type          its Exchange DeliveryType (a display field)
  route         the Celery queue its drain tasks go to
  created       ms
  suspended     "1" while an operator holds it (Suspend-Queue)
  failures      consecutive failed connection attempts (the retry schedule's position)
  next_retry    ms of the next attempt while in Retry
  last_retry    ms of the last failed attempt
  last_error    the last connection error
  last_active   ms of the last successful delivery
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class ItemStatus(StrEnum):
    """An item's Status, as Get-Message shows it."""

    READY = "Ready"  # on its queue's ready list
    ACTIVE = "Active"  # held by a worker under a lease
    RETRY = "Retry"  # waiting for its own retry time (my:retry)
    SUSPENDED = "Suspended"  # held by an operator, or in the Poison queue


class PendingAction(StrEnum):
    """What an operator asked for while the item was being delivered: it applies if that
    delivery does not finish the item (Exchange's PendingSuspend and PendingRemove)."""

    NONE = ""
    SUSPEND = "PendingSuspend"
    REMOVE = "PendingRemove"


class QueueKind(StrEnum):
    """What a queue is for; stored on the queue, so no code reads it off the identity."""

    SUBMISSION = "submission"  # the categorizer takes from it
    DELIVERY = "delivery"  # one per next hop: a mailbox server, a site, a domain, a smart host
    UNREACHABLE = "unreachable"  # no route: waits for a new connector or an operator
    POISON = "poison"  # crashed its workers: always suspended, never expires


class DeliveryType(StrEnum):
    """Exchange's DeliveryType of a queue (what Get-Queue shows)."""

    UNDEFINED = "Undefined"  # the Submission queue (next hop not known yet) and Poison
    MAPI = "MapiDelivery"
    REMOTE_SITE = "SmtpRelayToRemoteAdSite"
    DNS = "DnsConnectorDelivery"
    SMART_HOST = "SmartHostConnectorDelivery"
    UNREACHABLE = "Unreachable"


def _int(d: Mapping[str, str], name: str) -> int:
    return int(d.get(name, 0) or 0)


@dataclass
class Recipient:
    address: str
    original: str = ""  # ORCPT: the address the sender used, or the group it came from
    kind: str = ""
    status: str = ItemStatus.READY.value
    last_error: str = ""
    retries: int = 0

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"address": self.address}
        for name in ("original", "kind", "status", "last_error", "retries"):
            value = getattr(self, name)
            if value not in ("", 0):
                out[name] = value
        return out


def rcpts_json(recipients: list[Recipient]) -> str:
    return json.dumps([r.as_json() for r in recipients], separators=(",", ":"))


@dataclass
class Message:
    """The envelope and summary of one message (``my:msg:<id>``)."""

    id: str
    sender: str  # envelope MAIL FROM; "" is the null sender <>
    message_id: str = ""
    subject: str = ""
    size: int = 0
    received: int = 0  # ms
    expires: int = 0  # ms
    source: str = ""  # STOREDRIVER, SMTP, DSN
    origin: str = ""  # outbox item reference, or the SMTP client
    site: str = ""  # site of the hub that accepted it
    hub: str = ""
    dsn: str = ""  # "" for ordinary mail; "ndr" or "delay" for notifications we generated
    client: str = ""
    smtputf8: bool = False
    internal: bool = False  # SMTP: the organization's own mail (see from_organization)

    def fields(self) -> dict[str, str | int]:
        """What is stored in ``my:msg:<id>`` (empty fields left out: they read back as empty)."""
        out = {k: v for k, v in self.__dict__.items()
               if k not in ("id", "smtputf8", "internal") and v not in ("", 0)}
        for flag in ("smtputf8", "internal"):
            if getattr(self, flag):
                out[flag] = "1"
        return out

    @property
    def from_organization(self) -> bool:
        """Mail of the organization (an Edge DKIM-signs only that): from a mailbox, a report
        Mailyard made, or SMTP mail marked internal at intake; never Internet mail, however it
        is relayed on (to a group's external member, a contact)."""
        return self.internal or self.source in ("STOREDRIVER", "DSN")

    @property
    def wants_report(self) -> bool:
        """Whether a failure is reported to the sender: never to <>, never about a report."""
        return bool(self.sender) and not self.dsn

    @classmethod
    def load(cls, msg_id: str, d: Mapping[str, str]) -> Message:
        """The message from its hash's fields, as text (``redisconn.text_map``)."""
        return cls(
            id=msg_id,
            sender=d.get("sender", ""),
            message_id=d.get("message_id", ""),
            subject=d.get("subject", ""),
            size=_int(d, "size"),
            received=_int(d, "received"),
            expires=_int(d, "expires"),
            source=d.get("source", ""),
            origin=d.get("origin", ""),
            site=d.get("site", ""),
            hub=d.get("hub", ""),
            dsn=d.get("dsn", ""),
            client=d.get("client", ""),
            smtputf8=d.get("smtputf8") == "1",
            internal=d.get("internal") == "1",
        )


@dataclass
class Item:
    """One message in one queue (``my:item:<id>``), with its recipients' state."""

    id: str
    msg: str
    queue: str
    recipients: list[Recipient] = field(default_factory=list)
    status: str = ItemStatus.READY.value
    retries: int = 0
    last_error: str = ""
    crashes: int = 0
    lease: str = ""
    hub: str = ""
    enqueued: int = 0
    next_retry: int = 0
    pending: str = PendingAction.NONE.value
    remove_ndr: bool = True  # with PendingRemove: send the NDR
    leased: int = 0  # when the lease was taken, ms
    pid: int = 0  # the worker process holding the lease
    suspect: bool = False
    from_queue: str = ""

    @property
    def site(self) -> str:
        """The site whose queue holds the item (a queue identity is ``<site>\\<next hop>``)."""
        return self.queue.split("\\", 1)[0]

    @property
    def identity(self) -> str:
        """Exchange's message identity: ``<queue>\\<id>``."""
        return f"{self.queue}\\{self.id}"

    @classmethod
    def load(cls, item_id: str, d: Mapping[str, str]) -> Item:
        """The item from its hash's fields, as text (``redisconn.text_map``)."""
        return cls(
            id=item_id,
            msg=d.get("msg", ""),
            queue=d.get("queue", ""),
            recipients=[Recipient(**r) for r in json.loads(d.get("rcpts", "[]"))],
            status=d.get("status", ""),
            retries=_int(d, "retries"),
            last_error=d.get("last_error", ""),
            crashes=_int(d, "crashes"),
            lease=d.get("lease", ""),
            hub=d.get("hub", ""),
            enqueued=_int(d, "enqueued"),
            next_retry=_int(d, "next_retry"),
            pending=d.get("pending", ""),
            remove_ndr=d.get("remove_ndr", "1") != "0",
            leased=_int(d, "leased"),
            pid=_int(d, "pid"),
            suspect=d.get("suspect") == "1",
            from_queue=d.get("from_queue", ""),
        )


def new_message_id() -> str:
    """A message id unique across sites and Redis servers: time-ordered, then random."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(5)}"
