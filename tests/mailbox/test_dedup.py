"""Duplicate detection's pure parts: the Message-ID's tag, the windows, the index's trimming,
and the index built from a folder's file names."""

from __future__ import annotations

import time
from pathlib import Path

from mailyard.mailbox import dedup
from mailyard.org import TransportSettings

DAY = 86400.0


def test_a_message_id_is_compared_as_written_its_folding_aside() -> None:
    assert dedup.digest("<a@b>") == dedup.digest(" <a@b>\r\n") == dedup.digest(b"<a@b>")
    assert dedup.digest_of(b"Subject: x\r\nMessage-Id:\r\n\t<a@b>\r\n\r\n") == dedup.digest("<a@b>")
    assert dedup.digest("<A@b>") != dedup.digest("<a@b>")
    assert dedup.digest("") is None and dedup.digest_of(b"Subject: x\r\n\r\nMessage-ID: <in@body>\r\n") is None


def test_a_delivery_key_is_remembered_as_long_as_a_hub_may_retry() -> None:
    t = TransportSettings(duplicate_detection_window=60, message_expiration_timeout=2 * DAY)
    assert dedup.Windows.of(t) == dedup.Windows(message_id=60, key=2 * DAY)
    assert dedup.Windows.of(t.model_copy(update={"duplicate_detection_window": 5 * DAY})).key == 5 * DAY


def test_the_index_forgets_what_is_older_than_its_window() -> None:
    index, now = dedup.Index(), time.time()
    index.add("old", now - 3 * DAY, "k-old", "d-old")  # (in the order stored)
    index.add("mid", now - 1.5 * DAY, "k-mid", "d-mid")
    index.add("new", now - 60, "k-new", "d-new")
    index.add("again", now - 30, "k-again", "d-old")  # its Message-ID again, after its window
    index.trim(now, dedup.Windows(message_id=DAY, key=2 * DAY))
    assert index.by_digest == {"d-new": ("new", now - 60), "d-old": ("again", now - 30)}
    assert list(index.by_key) == ["k-mid", "k-new", "k-again"]


def test_the_index_is_built_from_the_file_names(tmp_path: Path) -> None:
    for part in ("tmp", "new", "cur"):
        (tmp_path / part).mkdir()
    now = int(time.time())
    d = dedup.digest("<a@b>")
    names = {
        "key and Message-ID": dedup.item_name(now, "Ykey1", d, "host.example"),
        "read and flagged": dedup.item_name(now, "M1P2Q3", dedup.digest("<c@d>"), "host") + ":2,S",
        "outside both windows": dedup.item_name(now - 30 * 86400, "Ykey2", dedup.digest("<e@f>"), "host"),
    }
    (tmp_path / "new" / names["key and Message-ID"]).write_bytes(b"Message-ID: <wrong>\r\n\r\n")
    (tmp_path / "cur" / names["read and flagged"]).write_bytes(b"")
    (tmp_path / "new" / names["outside both windows"]).write_bytes(b"")
    index = dedup.build([tmp_path], dedup.Windows(message_id=DAY, key=2 * DAY), time.time())
    assert index.by_key == {"key1": (names["key and Message-ID"], now)}, "the name, not the header, counts"
    assert set(index.by_digest) == {d, dedup.digest("<c@d>")}
    assert index.by_digest[dedup.digest("<c@d>")][0] == names["read and flagged"].split(":")[0]
