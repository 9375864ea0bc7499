"""Every Redis key Mailyard uses, in one place.

Redis holds the truth (DESIGN §2.1); Celery carries only queue names and outbox item
references. All keys start with ``my:``; Celery's own keys start with ``my:celery:``
(kombu's ``global_keyprefix``), so one Redis database serves both without collisions.

Organization directory
  my:org                      STRING  the validated organization, JSON (mailyard.org)
  my:org:version              STRING  integer, bumped by every ``mailyard org apply``
  my:org:changed              PUBSUB  announces a new version: receive connectors re-read at once (and poll the version)

Nodes
  my:hubs                     ZSET    hub name -> last heartbeat, ms since the epoch
  my:hub:<hub>                HASH    site, host, pid, started, celery queue, receive endpoints
  my:servers                  ZSET    mailbox server name -> last heartbeat, ms
  my:server:<server>          HASH    url (its HTTP API), site, pid, started
  my:sweeper                  STRING  name of the hub holding the sweeper lease (PX)
  my:pressure:<site>          HASH    back-pressure level of a site and its readings (PX 10 s)
  my:rerouted-version         STRING  organization version the Unreachable queues were last
                                      re-routed for (the sweeper re-routes after a change)

Mail submission service (mailbox server -> hub)
  my:submit:pending:<server>  ZSET    "<server>/<mailbox>/<item>" -> ack deadline, ms: every Outbox
                                      item of the server that no hub acknowledged yet
  my:submit:kick:<server>     STRING  the hub last told that the server's Outbox has mail, until its
                                      pickup begins (PX): no second kick while one is pending
  my:submit:<server>/<mailbox>/<item>
                              HASH    where versions before December 2026 counted notifications of
                                      one item; no longer written, each expires within 30 days

Messages and queue items
  my:seq:item                 STRING  counter; queue item ids (Exchange-style integers)
  my:msg:<msg>                HASH    envelope and summary of one message; the fields of this
                                      hash, of my:item and of my:queue: mailyard.hub.records
  my:body:<msg>               STRING  the RFC 5322 bytes, shared by all the message's items
  my:item:<item>              HASH    one message in one queue: recipients and their state
  my:mi:<msg>                 SET     the items that hold a message (its bifurcated copies)
  my:dedup:<origin>           STRING  message id already created for an origin: an Outbox item
                                      ("<server>/<mailbox>/<item>", so a repeated pickup creates
                                      nothing), or a message relayed over SMTP by another hub
                                      (X-Mailyard-Origin), so a repeated relay does not create it
                                      twice
  my:pickup:<server>/<mailbox>/<item>
                              STRING  where versions before December 2026 remembered a pickup (now
                                      my:dedup:); only read, and gone within 7 days
  my:request:<item>           STRING  what became of an operator's request on an item in flight
                                      ("Suspended", "delivered: the PendingSuspend came too
                                      late"), kept a day

Queues (identity "<site>\\<next hop>", e.g. "Amsterdam\\MBX-AMS-01")
  my:queues                   ZSET    queue identity -> created, ms
  my:queue:<q>                HASH    kind, delivery type, next hop, suspended, retry state
  my:ready:<q>                LIST    item ids ready to be taken, oldest first
  my:qm:<q>                   ZSET    every item in the queue -> date received into it, ms
  my:conns:<q>                ZSET    drain leases working on the queue -> lease expiry, ms;
                                      its size is the queue's connection count (capped)
  my:kick:<q>                 STRING  set while a Celery drain task for the queue is pending

Schedules (the sweeper acts on what is due)
  my:inflight                 ZSET    leased item -> lease expiry, ms
  my:retry                    ZSET    item waiting for its own retry -> due, ms
  my:expiry                   ZSET    item -> expiration time, ms
  my:delay                    ZSET    message -> time its delay DSN is due, ms

Failed SMTP logons (mailyard.hub.lockout; every key expires by itself)
  my:logon:fails:src:<source> STRING  failed logons from a source (an IPv4 address, an IPv6 /64)
                                      within the failure window
  my:logon:fails:acct:<mailbox>
                              STRING  failed logons as a mailbox (its primary address), from anywhere
  my:logon:failed:<mailbox>|<source>
                              STRING  "1": this source failed as this mailbox lately (as long as
                                      a lockout lasts, or the window if longer)
  my:logon:lock:src:<source>  STRING  set while the source is locked out of every logon
  my:logon:lock:acct:<mailbox>
                              STRING  set while the mailbox is locked for the sources that failed on it
  my:errors:src:<source>      STRING  5xx replies to a source that did not log on, within the window

Edge Transport (mailyard.edgesync). In the organization's Redis:
  my:edge:bootstrap:<edge>    STRING  the Edge's one-time bootstrap secret, from its subscription
                                      file, until the first EdgeSync has used it; expires with it
  my:edge:sync:<edge>         HASH    EdgeSync's state for the Edge: bootstrapped, config_at,
                                      recipients_at, recipients, by (the hub), error, error_at,
                                      hubs (the hub addresses last pushed: a change pushes at once)
  my:edge:sync-lease:<edge>   STRING  the hub pushing to that Edge now (PX)
  my:edge:sync-now:<edge>     STRING  set by `mailyard org edge sync`: push at once, then deleted
  my:dkim:keys                HASH    accepted domain -> its active DKIM key, JSON; <domain>/pending
                                      -> a key made but not yet activated (mailyard.dkim_keys);
                                      active keys are pushed to the Edges
In an Edge's own Redis (it never reaches the organization's):
  my:edge:recipients          SET     SHA-256 of every address that takes mail from outside,
                                      salted per Edge (EdgeSync: no address is stored in clear)
  my:edge:closed-groups       SET     the same of the groups that take mail only from
                                      authenticated senders (refused to anonymous ones)
  my:edge:staging:<key>       SET     a push being written, renamed onto <key> when complete
  my:edge:state               HASH    site, subscribed_at, config_at, recipients_at, recipients,
                                      by (the hub that pushed last), org_version (the organization
                                      version of the configuration taken: an older one is ignored)
  (its organization copy is my:org, written by EdgeSync with an ``edge`` section; its queues
  are the keys above, as on a hub)

Replication (mailyard.durability)
  my:durability:fence         PUBSUB  never subscribed to: an acknowledged write's pipeline
                                      PUBLISHes to it before WAIT, so the WAIT also covers a
                                      write a dedup guard found already done (nothing stored)

Tests
  my:fault:<point>            STRING  a crash point that already fired (mailyard.faults)

Message tracking and metrics
  my:track                    STREAM  tracking events (mailyard.tracking), trimmed by age
  my:stats                    HASH    "<EVENT>|<queue, connector or source>" -> count since the
                                      site began (recipients; messages for RECEIVE, SUBMIT, DSN);
                                      "SESSION|<hub>\\<connector>" -> SMTP sessions accepted
  my:sessions:<hub>           HASH    receive connector -> SMTP sessions open on it now, written by
                                      the hub's receive listener every second; expires after 10 s

Mail flow over time (mailyard.hub.flow; minutes are minutes since 1970, UTC)
  my:flow:raw:<minute>        HASH    counts as they happen, by every hub in its tracking writes:
                                      "<EVENT>|<site>\\<next hop>" -> recipients (DELIVER, SEND,
                                      DEFER, FAIL), "RECEIVE|<hub>" -> messages, and the sweeper's
                                      first sample in the minute, "DEPTH|<site>\\<next hop>" ->
                                      messages queued; expires after 3 h (rolled up long before)
  my:flow:<minute>            HASH    a closed minute, rolled up by the sweeper: "<site>|<metric>"
                                      and "<site>\\<next hop>|<metric>" -> count, metric one of
                                      received, delivered, deferred, failed, depth; only the
                                      minute's 20 busiest next hops by name, the rest summed as
                                      "<site>\\(other)"; zeros left out; expires after 25 h
  my:flow:rolled              STRING  the last minute rolled up
"""

from __future__ import annotations

P = "my:"

ORG = P + "org"
ORG_VERSION = P + "org:version"
ORG_CHANNEL = P + "org:changed"

HUBS = P + "hubs"
SERVERS = P + "servers"
SWEEPER = P + "sweeper"
REROUTED_VERSION = P + "rerouted-version"


SEQ_ITEM = P + "seq:item"

QUEUES = P + "queues"
INFLIGHT = P + "inflight"
RETRY = P + "retry"
EXPIRY = P + "expiry"
DELAY = P + "delay"
TRACK = P + "track"
STATS = P + "stats"
FLOW_ROLLED = P + "flow:rolled"


def flow_raw(minute: int) -> str:
    return f"{P}flow:raw:{minute}"


def flow(minute: int) -> str:
    return f"{P}flow:{minute}"


def sessions(hub: str) -> str:
    return f"{P}sessions:{hub}"

CELERY_PREFIX = P + "celery:"
DURABILITY_FENCE = P + "durability:fence"
EDGE_RECIPIENTS = P + "edge:recipients"
EDGE_STATE = P + "edge:state"
EDGE_CLOSED_GROUPS = P + "edge:closed-groups"
DKIM_KEYS = P + "dkim:keys"


def edge_staging(key: str) -> str:
    return f"{P}edge:staging:{key}"


def edge_bootstrap(edge: str) -> str:
    return f"{P}edge:bootstrap:{edge}"


def edge_sync(edge: str) -> str:
    return f"{P}edge:sync:{edge}"


def edge_sync_lease(edge: str) -> str:
    return f"{P}edge:sync-lease:{edge}"


def edge_sync_now(edge: str) -> str:
    return f"{P}edge:sync-now:{edge}"


def pressure(site: str) -> str:
    return f"{P}pressure:{site}"


def hub(name: str) -> str:
    return f"{P}hub:{name}"


def server(name: str) -> str:
    return f"{P}server:{name}"


def outbox_ref(server: str, mailbox: str, item: str) -> str:
    """The reference of one Outbox item, as stored in ``my:submit:pending:<server>``."""
    return f"{server}/{mailbox}/{item}"


def submit_pending(server: str) -> str:
    return f"{P}submit:pending:{server}"


def submit(ref: str) -> str:
    return f"{P}submit:{ref}"


def submit_kick(server: str) -> str:
    return f"{P}submit:kick:{server}"


def legacy_pickup(ref: str) -> str:
    return f"{P}pickup:{ref}"


def request_result(item_id: str) -> str:
    return f"{P}request:{item_id}"


def logon_fails_source(source: str) -> str:
    return f"{P}logon:fails:src:{source}"


def logon_fails_account(mailbox: str) -> str:
    return f"{P}logon:fails:acct:{mailbox}"


def logon_failed(mailbox: str, source: str) -> str:
    return f"{P}logon:failed:{mailbox}|{source}"


def logon_lock_source(source: str) -> str:
    return f"{P}logon:lock:src:{source}"


def logon_lock_account(mailbox: str) -> str:
    return f"{P}logon:lock:acct:{mailbox}"


def errors_source(source: str) -> str:
    return f"{P}errors:src:{source}"


def fault(point: str) -> str:
    return f"{P}fault:{point}"


def msg(msg_id: str) -> str:
    return f"{P}msg:{msg_id}"


def body(msg_id: str) -> str:
    return f"{P}body:{msg_id}"


def item(item_id: str | int) -> str:
    return f"{P}item:{item_id}"


def msg_items(msg_id: str) -> str:
    return f"{P}mi:{msg_id}"


def dedup(origin_id: str) -> str:
    return f"{P}dedup:{origin_id}"


def queue(q: str) -> str:
    return f"{P}queue:{q}"


def ready(q: str) -> str:
    return f"{P}ready:{q}"


def queue_members(q: str) -> str:
    return f"{P}qm:{q}"


def conns(q: str) -> str:
    return f"{P}conns:{q}"


def kick(q: str) -> str:
    return f"{P}kick:{q}"
