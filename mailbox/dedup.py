"""Duplicate detection at the mailbox, as the Exchange store does it.

A message is stored in a mailbox's folder once per ``Message-ID`` within the window
(``duplicate_detection_window``, 2 days), whatever hub or path brought it, and once per hub
delivery key (a hub retrying after a lost reply) for as long as a hub may retry (the
message expiration timeout, when that is longer).

The marker is the message's own file name, ``<time>.<unique>[.I<digest>].<host>``: the
unique part is ``Y<delivery key>`` for a hub's delivery, the digest a hash of the
Message-ID. The message and its marker so reach the disk in one rename; no failure between
two writes can leave a stored message without its marker, for a retry to store it again.
The names are indexed in memory per mailbox and scope (the Inbox; the Outbox with Sent
Items, where a sent item moves), built from the folder on its first use after a start
(names only, but for files named by an older version or another Maildir tool, whose headers
are read if they are recent), then kept up to date and trimmed to the window as mail comes.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mailyard import headers
from mailyard.org import TransportSettings

_NAME = re.compile(r"^(\d+)\.(?:Y([A-Za-z0-9_-]{1,64})|M\d+P\d+Q\d+)(?:\.I([0-9a-f]{24}))?\.")
_HEAD_BYTES = 64 * 1024  # read of a file named without its digest (a Message-ID further down is not seen)


@dataclass(frozen=True)
class Windows:
    """How long (seconds) a stored item answers for its Message-ID, and for its delivery key."""

    message_id: float
    key: float

    @classmethod
    def of(cls, t: TransportSettings) -> Windows:
        return cls(t.duplicate_detection_window, max(t.duplicate_detection_window, t.message_expiration_timeout))


def digest(message_id: str | bytes | None) -> str | None:
    """The file-name tag of a Message-ID (None when there is none): compared as written,
    its folding and surrounding white space aside."""
    if isinstance(message_id, str):
        message_id = message_id.encode("utf-8", "surrogateescape")
    value = b" ".join(message_id.split()) if message_id else b""
    return hashlib.blake2b(value, digest_size=12).hexdigest() if value else None


def digest_of(raw: bytes) -> str | None:
    return digest(headers.first_value(raw, "Message-ID"))


def item_name(stamp: int, unique: str, message_digest: str | None, host: str) -> str:
    """An item's file name: ``unique`` is ``Y<delivery key>`` or ``M<µs>P<pid>Q<sequence>``."""
    return f"{stamp}.{unique}{f'.I{message_digest}' if message_digest else ''}.{host}"


@dataclass
class Index:
    """The items of one scope stored within the windows: by delivery key and by Message-ID
    digest, each ``value -> (item id, stored at)`` in the order stored, so trimming pops from
    the front."""

    by_key: dict[str, tuple[str, float]] = field(default_factory=dict)
    by_digest: dict[str, tuple[str, float]] = field(default_factory=dict)

    def add(self, item_id: str, stored_at: float, key: str | None, message_digest: str | None) -> None:
        for table, value in ((self.by_key, key), (self.by_digest, message_digest)):
            if value:
                table.pop(value, None)  # (re-stored after its window: now the newest)
                table[value] = (item_id, stored_at)

    def trim(self, now: float, windows: Windows) -> None:
        for table, window in ((self.by_key, windows.key), (self.by_digest, windows.message_id)):
            while table:
                first = next(iter(table))
                if now - table[first][1] <= window:
                    break
                del table[first]


def build(folders: list[Path], windows: Windows, now: float) -> Index:
    """The index of what ``folders`` (Maildirs) hold, from their file names."""
    found: list[tuple[float, str, str | None, str | None]] = []
    horizon = max(windows.key, windows.message_id)
    for folder in folders:
        for part in ("new", "cur"):
            directory = folder / part
            for name in os.listdir(directory):
                item_id = name.split(":")[0]
                m = _NAME.match(item_id)
                try:
                    stored_at = float(m.group(1)) if m else (directory / name).stat().st_mtime
                    if now - stored_at > horizon:
                        continue
                    key, message_digest = (m.group(2), m.group(3)) if m else (None, None)
                    if message_digest is None and now - stored_at <= windows.message_id:
                        with open(directory / name, "rb") as fh:  # named by an older version or another tool
                            message_digest = digest_of(fh.read(_HEAD_BYTES))
                except FileNotFoundError:
                    continue  # moved or removed meanwhile
                found.append((stored_at, item_id, key, message_digest))
    index = Index()
    for stored_at, item_id, key, message_digest in sorted(found):
        index.add(item_id, stored_at, key, message_digest)
    index.trim(now, windows)
    return index
