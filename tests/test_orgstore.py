"""The organization as nodes read it: an asyncio server's watcher takes a new version the
moment ``apply_org`` announces it, and still finds one that was never announced."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from mailyard import keys, redisconn
from mailyard.orgstore import AsyncOrgWatcher, apply_org
from tests.conftest import make_org


async def _assert_soon(check: Callable[[], bool], message: str, timeout: float = 10.0) -> None:
    """Assert that ``check`` holds within ``timeout`` seconds (polled)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(message)
        await asyncio.sleep(0.02)


def _subscribed(r) -> bool:
    return dict(r.pubsub_numsub(keys.ORG_CHANNEL)).get(keys.ORG_CHANNEL.encode(), 0) >= 1


def test_an_applied_organization_is_taken_at_once_not_at_the_next_poll(redis_url: str) -> None:
    async def scenario() -> None:
        r = redisconn.connect_async(redis_url)
        sync_r = redisconn.connect(redis_url)
        apply_org(sync_r, make_org())
        watcher = AsyncOrgWatcher(r, interval=600)  # (a poll would come far too late)
        await watcher.refresh()
        task = asyncio.create_task(watcher.run())
        try:
            # (an announcement before the watcher listens is missed by design: the poll finds it)
            await _assert_soon(lambda: _subscribed(sync_r), "the watcher never subscribed to the announcements")
            for name in ("Contoso One", "Contoso Two"):  # (and again: the subscription stays)
                apply_org(sync_r, make_org().model_copy(update={"name": name}))
                await _assert_soon(lambda: watcher.current().org.name == name,  # noqa: B023 (awaited here)
                                   f"the watcher did not take {name!r} at its announcement")
        finally:
            task.cancel()
            await r.aclose()

    asyncio.run(scenario())


def test_a_version_nobody_announced_is_found_by_the_poll(redis_url: str) -> None:
    async def scenario() -> None:
        r = redisconn.connect_async(redis_url)
        sync_r = redisconn.connect(redis_url)
        apply_org(sync_r, make_org())
        watcher = AsyncOrgWatcher(r, interval=0.2)
        await watcher.refresh()
        task = asyncio.create_task(watcher.run())
        try:
            # Written as an older Mailyard would, without the announcement
            sync_r.set(keys.ORG, make_org().model_copy(update={"name": "Unannounced"}).to_json())
            sync_r.incr(keys.ORG_VERSION)
            await _assert_soon(lambda: watcher.current().org.name == "Unannounced",
                               "the poll did not find a version nobody announced")
        finally:
            task.cancel()
            await r.aclose()

    asyncio.run(scenario())

