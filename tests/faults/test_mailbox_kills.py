"""Mailbox servers killed during delivery and during submission while mail flows: restarted,
they lose and double nothing."""

from __future__ import annotations

import time

import pytest

from mailyard import keys


@pytest.mark.slow
def test_mailbox_servers_killed_during_delivery_and_submission(world_factory) -> None:
    world = world_factory()
    for server in ("MBX-AMS-01", "MBX-AMS-02", "MBX-LON-01"):
        world.site.kill(server, stay_down=True)
        world.site.start_mailbox(server, faults="mailbox.deliver.stored=child,mailbox.outbox.stored=child")
    stream = world.stream("mailbox-kills").run(28, interval=0.1)
    stream.wait_sent()
    stream.verdict(time.monotonic())
    for point in ("mailbox.deliver.stored", "mailbox.outbox.stored"):
        assert world.site.r.exists(keys.fault(point)), f"{point} never fired"
