"""Ready means ready (issue 16, item 6): `mailyard site up` says "The site is up", and
`site status --json` says ``"ready": true``, only when every endpoint it lists answers as a
client would reach it: each receive connector greets, each mailbox server and the Queue Viewer
answer, Flower lists every hub as online, the demo Internet answers DNS and SMTP. The same
holds for a process the site started again after it died."""

from __future__ import annotations

import os
import signal

import pytest

from mailyard.testing.waiting import PROCESS_POLL, wait_until
from tests.site_run import RunningSite, unanswered

# A connector listening half a second late was seen in 1 of 3 fresh starts (since fixed): the
# demo as it comes (with its Edge, whose endpoints count too), then without (the Edge's
# processes are the costliest to start, and the hubs' Internet connectors come back without it).
STARTS = ((), ("--no-edge",))


@pytest.mark.slow
def test_right_after_site_up_says_the_site_is_up_every_endpoint_it_lists_answers(tmp_path) -> None:
    for start, options in enumerate(STARTS):
        data = tmp_path / f"var-{start}"  # a first start each time: secrets, certificates, Redis
        site = RunningSite(data, "--hubs", "1", "--free-ports", *options)
        try:
            state = site.wait_up()
            assert state["ready"] and all(p["ready"] for p in state["processes"]), state
            assert unanswered(state, data) == [], f"start {start + 1} of {len(STARTS)} {options}"
            assert any(p["role"] == "edge" for p in state["processes"]) == (not options), state["processes"]
            status = site.status()
            assert status["ready"] and all(p["ready"] and p["up"] for p in status["processes"])
            assert unanswered(status, data) == []
        finally:
            site.stop()


@pytest.mark.slow
def test_a_process_started_again_is_ready_only_once_it_answers(tmp_path) -> None:
    data = tmp_path / "var"
    site = RunningSite(data, "--hubs", "1", "--free-ports", "--no-edge")
    broken: list[str] = []  # a status that said ready while something did not answer
    try:
        state = site.wait_up()
        for role in ("hub", "mailbox", "flower"):
            before = next(p for p in state["processes"] if p["role"] == role)
            os.kill(before["pid"], signal.SIGKILL)

            def back(before: dict = before) -> dict | None:
                status = site.status()
                if not status["ready"]:
                    return None
                # Whenever the status says ready, everything it lists answers (the killed one
                # included: it is ready only once it was started again and answers)
                now = next(p for p in status["processes"] if p["name"] == before["name"])
                if now["pid"] == before["pid"]:
                    broken.append(f"{before['name']} was killed, yet the site said ready")
                broken.extend(unanswered(status, data))
                return status

            state = wait_until(back, timeout=120, interval=PROCESS_POLL,
                               message=lambda before=before: f"{before['name']} not ready again: {site.output[-3000:]}")
            assert broken == [], broken
            restarted = next(p for p in state["processes"] if p["name"] == before["name"])
            assert restarted["restarts"] == 1 and restarted["ready"], restarted
    finally:
        site.stop()
