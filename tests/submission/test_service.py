"""The Mail Submission Service against a real Redis, without hubs: what it registers and when
it lets a registration go."""

from __future__ import annotations

from mailyard import keys, redisconn
from mailyard.orgstore import OrgCache, apply_org
from mailyard.registry import now_ms
from mailyard.submission.service import SubmissionService
from tests.conftest import make_org

SERVER = "MBX-AMS-01"


def service(redis_url: str, outbox: set[tuple[str, str]]) -> SubmissionService:
    r = redisconn.connect(redis_url)
    apply_org(r, make_org())
    return SubmissionService(r, redis_url, OrgCache(r), SERVER, lambda: sorted(outbox),
                             is_waiting=lambda mailbox, item: (mailbox, item) in outbox)


def test_the_scan_registers_outbox_items_redis_does_not_know(redis_url: str) -> None:
    outbox = {("alice@contoso.com", "1.M1.h"), ("bob@contoso.com", "2.M2.h")}
    svc = service(redis_url, outbox)
    assert svc.scan() == 2
    assert svc.scan() == 0, "registered once"
    assert svc.r.zcard(keys.submit_pending(SERVER)) == 2


def test_a_registration_whose_item_left_the_outbox_is_let_go_not_kicked_for_ever(redis_url: str) -> None:
    # A scan read the Outbox, the item was acknowledged (and unregistered), then the scan's
    # ZADD registered it again: due, for an item no hub can take any more
    outbox = {("alice@contoso.com", "1.M1.h")}
    svc = service(redis_url, outbox)
    pending = keys.submit_pending(SERVER)
    svc.r.zadd(pending, {svc.ref("alice@contoso.com", "1.M1.h"): now_ms(), svc.ref("bob@contoso.com", "9.M9.h"): now_ms()})
    svc.run_once()  # (no hub is alive: the waiting item stays due, the other goes)
    assert [m.decode() for m in svc.r.zrange(pending, 0, -1)] == [svc.ref("alice@contoso.com", "1.M1.h")]
    assert not svc.r.exists(keys.submit_kick(SERVER)), "no hub was kicked: none is alive"
