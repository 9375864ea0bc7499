"""Content filtering on an Edge (Exchange's Content Filter agent, end of DATA), by rspamd over
its HTTP protocol (``POST /checkv2``, mailyard.edge.rspamd starts one). rspamd's verdict becomes
Exchange's spam confidence level (SCL, 0-9):

    no action 0 (1 with a positive score), greylist 4, add header / rewrite subject 5,
    soft reject 6, reject 7, the GTUBE test pattern 9

compared with Exchange's thresholds (``[antispam]``): at ``scl_reject_threshold`` (7) the
message is refused with ``content_reject_response`` ("Message rejected due to content
restrictions"), at ``scl_delete_threshold`` (9, off) it is taken and dropped; any other is
stamped ``X-Mailyard-SCL`` (which hubs take only from a subscribed Edge) and the mailbox server
files it in Junk Email above ``scl_junk_threshold`` (4). rspamd that does not answer lets the
message through unstamped (logged): a filter that is down must not stop mail.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx

log = logging.getLogger("mailyard.hub.content_filter")

SCL_HEADER = "X-Mailyard-SCL"
TIMEOUT_S = 15.0
SCL_BY_ACTION = {"no action": 0, "greylist": 4, "add header": 5, "rewrite subject": 5, "soft reject": 6,
                 "reject": 7, "discard": 7, "quarantine": 7}


@dataclass(frozen=True)
class Verdict:
    scl: int
    action: str
    score: float
    symbols: tuple[str, ...]

    @property
    def summary(self) -> str:
        return f"SCL {self.scl} (rspamd {self.action}, {self.score:.1f}: {', '.join(self.symbols[:8]) or '-'})"


def scl_of(reply: dict[str, object]) -> Verdict:
    symbols = reply.get("symbols") or {}
    names = tuple(sorted(symbols)) if isinstance(symbols, dict) else ()
    action = str(reply.get("action", "no action"))
    try:
        score = float(reply.get("score") or 0.0)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        score = 0.0
    scl = 9 if "GTUBE" in names else SCL_BY_ACTION.get(action, 0)
    if scl == 0 and score > 0:
        scl = 1
    return Verdict(scl, action, score, names)


async def check(url: str, raw: bytes, *, ip: str, helo: str, sender: str, recipients: list[str],
                queue_id: str = "") -> Verdict | None:
    """rspamd's verdict on a message, None when it could not be asked."""
    # (as UTF-8 bytes: an SMTPUTF8 address must not make the request fail and the message go unfiltered)
    head = [(k.encode(), v.encode("utf-8", "replace")) for k, v in
            [("IP", ip), ("Helo", helo), ("From", sender or "<>"), *(("Rcpt", r) for r in recipients)]]
    if queue_id:
        head.append((b"Queue-Id", queue_id.encode()))
    try:
        async with httpx.AsyncClient(timeout=TIMEOUT_S, trust_env=False) as client:
            response = await client.post(f"{url}/checkv2", content=raw, headers=head)
        response.raise_for_status()
        return scl_of(response.json())
    except (httpx.HTTPError, ValueError) as exc:
        log.warning("rspamd at %s did not answer (%s): the message goes unfiltered", url, exc)
        return None
