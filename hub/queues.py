"""The mail queue contract: every state change of queued mail goes through it (DESIGN §2.6).

Queues are objects. A queue has an identity (``<site>\\<next hop>``), a kind (``QueueKind``:
Submission, a delivery queue for one next hop, Unreachable, Poison), Exchange's
DeliveryType, a Status and a message count. It holds *items*: one message for some of its
recipients (mailyard.hub.records). Any hub of the site works on any of its queues.

How an item moves, and the operation that moves it:

- ``Change.enqueue`` puts a new item on a queue's ready list (and asks for a drain);
- ``MailQueues.claim`` hands a worker up to N ready items of one queue under a lease (a
  token), ``renew`` extends it while a slow next hop talks, ``release`` frees the worker's
  connection slot. Every later change of a claimed item is guarded by that lease, so a
  worker that lost it (stalled, presumed dead) changes nothing;
- a delivery ends in one of: ``complete`` (every recipient done: the item is gone),
  ``park`` (it waits for its own retry time, or stays suspended), ``put_back`` (the next hop
  could not be reached: back to the front of its queue), ``to_poison``;
- the operator's ``suspend``, ``resume``, ``move`` (resubmit) and ``remove`` (``complete`` of
  an item that was not claimed) act on items that are not in flight; on an Active item the
  operator can only ``request`` a ``PendingAction``, which the delivery's outcome then
  honours: the worker guards its outcome with ``require_pending`` on the request it read, and
  reads the item again when that guard fails, so a request made at any moment is never lost;
- the sweeper's reads find ``expired_leases`` (their worker died: ``put_back`` or
  ``to_poison``), ``due_retries`` (``promote``), ``expiring`` items (``complete`` with an NDR)
  and ``due_delay_reports``; ``stalled_queues`` are queues with ready mail and no drain.

A ``Change`` is one atomic step: its guards are checked and its effects applied together
when the store commits it, or nothing is applied; a crash between two steps leaves every
message in exactly one place. Tracking records and reports are part of the step that
causes them. Commit several changes at once with ``MailQueues.commit``: each is atomic on
its own. ``enqueue``, ``resume``, ``promote`` and ``move`` also queue the drain task of the
queue they make non-empty (a kick), in the same step, for the kinds a stage drains;
``put_back`` does not (the worker that puts an item back is draining that queue, and the
sweeper kicks the queue of an item it reclaims).

Two implementations hold this contract: mailyard.hub.redis_queues (the real one, in Redis,
each change one Lua call) and mailyard.hub.memory_queues (in memory, for fast tests of the
stages' rules); tests/hub/test_queues.py runs one behaviour suite against both.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol, Self

from mailyard.broker import site_queue
from mailyard.hub.records import (
    DeliveryType,
    Item,
    Message,
    QueueKind,
    Recipient,
)

if TYPE_CHECKING:
    from mailyard.tracking import Record


# The kinds of queue a stage drains (mailyard.hub.runner); mail in the others waits for an
# operator or an organization change, so no drain task is ever queued for them.
DRAINED = frozenset({QueueKind.SUBMISSION, QueueKind.DELIVERY})


class QueueStatus(StrEnum):
    """A queue's Status, as Get-Queue shows it (derived from its state: ``queue_status``)."""

    ACTIVE = "Active"  # a worker holds a connection to the next hop
    READY = "Ready"
    RETRY = "Retry"  # waiting for its next retry time after a failed connection
    SUSPENDED = "Suspended"  # held by an operator (Suspend-Queue)


@dataclass(frozen=True)
class QueueSpec:
    """What a queue is: created on first use, never changed afterwards."""

    identity: str
    site: str
    kind: QueueKind
    delivery_type: DeliveryType
    next_hop: str
    celery_queue: str  # the Celery queue its drain tasks go to
    connector: str = ""


def submission_queue(site: str) -> QueueSpec:
    return QueueSpec(f"{site}\\Submission", site, QueueKind.SUBMISSION, DeliveryType.UNDEFINED, "Submission",
                     site_queue(site))


def unreachable_queue(site: str) -> QueueSpec:
    return QueueSpec(f"{site}\\Unreachable", site, QueueKind.UNREACHABLE, DeliveryType.UNREACHABLE,
                     "Unreachable Domain", site_queue(site))


def poison_queue(site: str) -> QueueSpec:
    return QueueSpec(f"{site}\\Poison", site, QueueKind.POISON, DeliveryType.UNDEFINED, "Poison", site_queue(site))


def mapi_queue(site: str, server: str) -> QueueSpec:
    return QueueSpec(f"{site}\\{server}", site, QueueKind.DELIVERY, DeliveryType.MAPI, server, site_queue(site))


def remote_site_queue(site: str, target: str) -> QueueSpec:
    return QueueSpec(f"{site}\\{target}", site, QueueKind.DELIVERY, DeliveryType.REMOTE_SITE, target,
                     site_queue(site))


def standing_queues(site: str, servers: Sequence[str]) -> list[QueueSpec]:
    """A site's queues that exist before any mail has passed: Submission and Unreachable
    (Exchange always shows them) and one MapiDelivery queue per mailbox server, so an
    operator can see and suspend them from the start."""
    return [submission_queue(site), unreachable_queue(site), *(mapi_queue(site, s) for s in servers)]


@dataclass
class QueueInfo:
    """A queue as Get-Queue shows it."""

    identity: str
    site: str
    kind: QueueKind
    delivery_type: str
    next_hop: str
    status: QueueStatus
    message_count: int
    ready: int
    last_error: str
    last_retry: int
    next_retry: int  # 0 unless in Retry
    failures: int
    connections: int
    celery_queue: str
    connector: str
    created: int
    suspended: bool

    def as_dict(self) -> dict[str, object]:
        return {
            "identity": self.identity,
            "kind": self.kind.value,  # what the queue is for: decide by it, never by the identity
            "delivery_type": self.delivery_type,
            "status": self.status.value,
            "message_count": self.message_count,
            "next_hop_domain": self.next_hop,
            "last_error": self.last_error,
            "last_retry_time": _iso(self.last_retry),
            "next_retry_time": _iso(self.next_retry),
            "site": self.site,
            "connections": self.connections,
            "connector": self.connector,
        }


def _iso(ms: int) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000)) if ms else None


def queue_status(suspended: bool, next_retry: int, connections: int, now: int) -> QueueStatus:
    if suspended:
        return QueueStatus.SUSPENDED
    if next_retry > now:
        return QueueStatus.RETRY
    if connections:
        return QueueStatus.ACTIVE
    return QueueStatus.READY


@dataclass
class Claimed:
    """What ``claim`` took: the items, their messages, and how many are still waiting."""

    items: list[Item]
    messages: dict[str, Message]
    remaining: int


@dataclass(frozen=True)
class Worker:
    """Who holds a lease: a hub and its worker process."""

    hub: str
    pid: int


@dataclass
class Committed:
    """The result of committing one ``Change``."""

    ok: bool
    failed: str = ""  # the name of the guard that failed: "lease", "status", "pending", "new", "first", ...
    value: str | None = None  # with a failed "first" guard: the message id recorded the first time
    drains: list[str] = field(default_factory=list)  # queues whose drain task this step queued


class Change(Protocol):
    """One atomic step. Guards first (all must hold when it is committed), then effects."""

    # guards
    def require_lease(self, item: Item, token: str) -> Self:
        """The item is still held under ``token`` (the worker did not lose it)."""
        ...

    def require_lease_expired(self, item: Item, now: int) -> Self:
        """The item's lease still ends by ``now``: its worker did not renew it since it was
        read as expired (a renewal that comes after that read keeps the item its worker's)."""
        ...

    def require_status(self, item: Item, status: str) -> Self:
        """The item still exists and is in ``status``."""
        ...

    def require_state(self, item: Item) -> Self:
        """The item is still where and as the caller read it: same queue, same status, and no
        delivery attempt since (an operator's action on an item that is not in flight)."""
        ...

    def require_pending(self, item: Item, pending: str) -> Self:
        """The operator's request on the item is still ``pending`` (what the caller read)."""
        ...

    def require_new_message(self, msg_id: str) -> Self:
        """No message ``msg_id`` exists (this very step was not applied already)."""
        ...

    def require_first(self, dedup: str) -> Self:
        """Nothing was remembered under ``dedup``; when it fails, ``Committed.value`` is the
        id of the message created the first time."""
        ...

    def require_no_delay_report(self, msg_id: str) -> Self:
        """The message exists and got no delay DSN yet."""
        ...

    # messages
    def add_message(self, msg: Message, body: bytes, *, refs: int, delay_report_at: int = 0) -> Self:
        """Store a new message held by ``refs`` items; schedule its delay DSN if it can get one."""
        ...

    def hold_message(self, msg_id: str) -> Self:
        """One more item holds the message."""
        ...

    def remember(self, dedup: str, msg_id: str, ttl_s: int) -> Self:
        """Record that ``dedup`` became ``msg_id`` (see ``require_first``)."""
        ...

    def delay_report_sent(self, msg_id: str, now: int) -> Self: ...

    def unschedule_delay_report(self, msg_id: str) -> Self: ...

    def schedule_delay_report(self, msg_id: str, at: int) -> Self:
        """Look at the message's delay DSN again at ``at`` (it is not due for report yet)."""
        ...

    # items
    def enqueue(self, spec: QueueSpec, item_id: str, msg: Message, recipients: list[Recipient], *,
                now: int) -> Self:
        """A new item, Ready at the back of ``spec``'s queue (created if needed), expiring with
        its message (unless the queue is Poison)."""
        ...

    def complete(self, item: Item, *, claimed: bool) -> Self:
        """The item leaves its queue and every schedule for good (delivered, failed, removed,
        expired); the last item of a message deletes it. ``claimed``: the caller holds it from
        ``claim``, so it is not on the ready list."""
        ...

    def park(self, item: Item, recipients: list[Recipient], *, until: int | None, last_error: str) -> Self:
        """A claimed item waits with ``recipients`` left: for its own retry at ``until``, or
        Suspended (``until`` None) until an operator resumes it."""
        ...

    def put_back(self, item: Item, *, status: str, last_error: str, recipients: list[Recipient] | None = None,
                 crashes: int | None = None, retries: int | None = None, suspect: bool = False) -> Self:
        """A claimed item goes back to the front of its queue's ready list, unleased."""
        ...

    def to_poison(self, item: Item, *, crashes: int, reason: str, now: int) -> Self:
        """The item crashed its workers ``crashes`` times: into its site's Poison queue,
        suspended, never expiring."""
        ...

    def request(self, item: Item, pending: str, *, ndr: bool = True) -> Self:
        """An operator's ``PendingAction`` on an Active item (guard it with ``require_lease``);
        what became of an earlier request is forgotten."""
        ...

    def note(self, item: Item, result: str) -> Self:
        """Record what became of an operator's request on the item ("Suspended", "Removed",
        "delivered: the PendingSuspend came too late"), for ``MailQueues.request_result``."""
        ...

    def suspend(self, item: Item) -> Self:
        """A Ready or Retry item is held (Suspend-Message)."""
        ...

    def resume(self, item: Item) -> Self:
        """A Suspended item is Ready again, at the back of its queue."""
        ...

    def promote(self, item: Item) -> Self:
        """An item whose own retry time came is Ready again."""
        ...

    def move(self, item: Item, target: QueueSpec, *, now: int, expires: int = 0, reset_crashes: bool = False
             ) -> Self:
        """An item that is not in flight moves to ``target`` (resubmit), Ready; ``expires``
        (its message's expiration time) schedules its expiry again (an item leaving Poison)."""
        ...

    # queues
    def ensure_queue(self, spec: QueueSpec, now: int) -> Self: ...

    def set_queue(self, identity: str, **fields: str | int) -> Self:
        """Change a queue's state fields (suspended, failures, next_retry, last_error, ...),
        only if the queue exists."""
        ...

    def kick(self, identity: str, celery_queue: str, *, force: bool = False) -> Self:
        """Queue a drain task for the queue, unless one is pending already (``force``: even
        then, so that another worker joins a backlog)."""
        ...

    # the tracking log
    def track(self, record: Record, now: int) -> Self:
        """Write ``record`` to the message tracking log as part of this step."""
        ...


class MailQueues(Protocol):
    """Every queue of a site's organization, and the items in them."""

    @property
    def retention_s(self) -> float:
        """How long tracking records are kept."""
        ...

    def change(self) -> Change: ...

    def commit(self, changes: Sequence[Change], *, replicated: bool = False) -> list[Committed]:
        """Apply ``changes`` in order, each atomically; one round trip where possible.
        ``replicated``: before returning, a replica has them, else ``durability.NotReplicated``
        (transport setting ``durability``; a store with no replicas ignores it)."""
        ...

    def new_item_ids(self, count: int) -> list[str]: ...

    # leases
    def claim(self, queue: str, *, worker: Worker, n: int, lease_ms: int, cap: int, token: str
              ) -> Claimed | None:
        """Take up to ``n`` ready items under ``token``'s lease; None when the queue may not
        be taken from now (suspended, in Retry, or ``cap`` workers hold it already). A
        ``suspect`` item is taken alone."""
        ...

    def renew(self, queue: str, token: str, item_ids: list[str], lease_ms: int) -> list[str]:
        """Extend to now + ``lease_ms`` the leases of those of ``item_ids`` still held under
        ``token`` (Active and leased by it; expired or not, for until the sweeper takes an item
        back it is still the worker's), and the token's connection slot with them. Returns the
        ids renewed: a stale holder (its items taken back, claimed by another worker, or
        finished) renews nothing and keeps no slot. Renewing never changes an item otherwise,
        and never brings back one that is gone."""
        ...

    def release(self, queue: str, token: str) -> None: ...

    def celery_queue_of(self, identity: str) -> str:
        """The Celery queue that the queue's drain tasks go to (fixed when it was created)."""
        ...

    def done_draining(self, queue: str) -> bool:
        """A drain found the queue empty: its kick marker goes; True if mail arrived in
        between (the drain then kicks the queue again, so nothing is stranded)."""
        ...

    # reading
    def queues(self, identities: list[str] | None = None) -> list[QueueInfo]: ...

    def members(self, queue: str, limit: int = -1) -> list[str]:
        """Item ids of a queue, oldest first."""
        ...

    def items(self, ids: list[str]) -> list[Item]: ...

    def items_of(self, msg_id: str) -> list[Item]: ...

    def messages(self, ids: list[str]) -> dict[str, Message]: ...

    def bodies(self, ids: list[str]) -> dict[str, bytes]: ...

    def known(self, dedup: str) -> str | None:
        """The message id remembered under ``dedup``, if any."""
        ...

    def request_result(self, item_id: str) -> str | None:
        """What became of the last operator's request on an item (see ``Change.note``)."""
        ...

    # the sweeper's schedules
    def expired_leases(self, now: int, limit: int) -> list[Item]: ...

    def due_retries(self, now: int, limit: int) -> list[Item]: ...

    def expiring(self, now: int, limit: int) -> list[Item]: ...

    def due_delay_reports(self, now: int, limit: int) -> list[str]: ...

    def stalled_queues(self, now: int) -> list[QueueInfo]:
        """Queues with ready mail, not suspended, not waiting for a retry, that no worker
        drains and no drain task is pending for."""
        ...

