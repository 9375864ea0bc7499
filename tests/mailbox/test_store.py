"""The mailbox store: Maildir++ on disk, durable writes, idempotent delivery."""

from __future__ import annotations

import mailbox as stdlib_mailbox

import pytest

from mailyard.errors import NotFoundError
from mailyard.mailbox.store import MailboxStore

RAW = b"From: a@t.example\r\nTo: b@t.example\r\nSubject: hi\r\nMessage-ID: <1@t>\r\n\r\nbody\r\n"


@pytest.fixture
def store(tmp_path) -> MailboxStore:
    s = MailboxStore(tmp_path / "MBX", "MBX")
    s.ensure("b@t.example")
    return s


def test_folders_are_a_maildir_plus_plus_that_the_standard_library_reads(store, tmp_path) -> None:
    store.put("b@t.example", "Inbox", RAW)
    store.put("b@t.example", "Outbox", RAW.replace(b"hi", b"out"))
    md = stdlib_mailbox.Maildir(tmp_path / "MBX" / "b@t.example", create=False)
    assert [m["Subject"] for m in md] == ["hi"]
    assert sorted(md.list_folders()) == ["Outbox", "Sent Items"]
    assert [m["Subject"] for m in md.get_folder("Outbox")] == ["out"]


def test_delivery_is_idempotent_per_message(store) -> None:
    first, fresh = store.deliver("b@t.example", "msg1", RAW)
    again, fresh_again = store.deliver("b@t.example", "msg1", RAW)
    assert fresh and not fresh_again and first == again
    assert len(store.list("b@t.example", "Inbox")) == 1


def test_a_crash_between_write_and_marker_is_recovered_at_start(tmp_path) -> None:
    s = MailboxStore(tmp_path / "MBX", "MBX")
    s.ensure("b@t.example")
    s.deliver("b@t.example", "msg2", RAW)
    base = tmp_path / "MBX" / "b@t.example"
    (base / "mailyard-delivered" / "msg2").unlink()  # as if the process died right there
    (base / "tmp" / "half-written").write_bytes(b"partial")
    restarted = MailboxStore(tmp_path / "MBX", "MBX")
    restarted.ensure("b@t.example")
    assert not (base / "tmp" / "half-written").exists(), "partial writes are cleared"
    _, fresh = restarted.deliver("b@t.example", "msg2", RAW)
    assert not fresh, "the message on disk must count as delivered after a restart"
    assert len(restarted.list("b@t.example", "Inbox")) == 1


def test_move_to_sent_items_marks_it_seen(store) -> None:
    item = store.put("b@t.example", "Outbox", RAW)
    store.move("b@t.example", item, "Outbox", "Sent Items")
    assert store.ids("b@t.example", "Outbox") == []
    (moved,) = store.list("b@t.example", "Sent Items")
    assert moved.id == item and moved.seen
    assert store.read("b@t.example", "sent items", item) == RAW


@pytest.mark.parametrize("bad", ["../b@t.example", "x/../../etc", ".hidden", "a\x00b"])
def test_path_tricks_in_item_ids_and_mailboxes_find_nothing(store, bad: str) -> None:
    with pytest.raises(NotFoundError):
        store.read("b@t.example", "Inbox", bad)
    with pytest.raises(NotFoundError):
        store.read(bad, "Inbox", "x")


def test_unknown_folders_are_refused(store) -> None:
    with pytest.raises(NotFoundError, match="folders are Inbox, Outbox, Sent Items"):
        store.list("b@t.example", "Junk")


def test_maildirs_are_0700_and_messages_0600_from_the_start_whatever_the_umask(tmp_path) -> None:
    import os
    import stat

    old = os.umask(0)  # (a permissive umask: the modes must not depend on it)
    try:
        s = MailboxStore(tmp_path / "MBX", "MBX")
        s.ensure("b@t.example")
        s.deliver("b@t.example", "msg3", RAW)
        s.submit("b@t.example", "<2@t>", RAW)
        item = s.put("b@t.example", "Outbox", RAW)
        s.move("b@t.example", item, "Outbox", "Sent Items")
    finally:
        os.umask(old)
    root = tmp_path / "MBX"
    paths = [root, *root.rglob("*")]
    assert any(p.parent.name == "new" for p in paths) and any(p.parent.name == "cur" for p in paths)
    for path in paths:
        wanted = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.stat().st_mode) == wanted, f"{path.relative_to(tmp_path)}: {path.stat().st_mode:o}"


def test_an_older_store_that_others_may_enter_is_tightened_on_first_use(tmp_path) -> None:
    import os
    import stat

    base = tmp_path / "MBX" / "b@t.example"
    for part in ("tmp", "new", "cur"):
        (base / part).mkdir(parents=True)
    os.chmod(tmp_path / "MBX", 0o755)
    os.chmod(base, 0o755)
    MailboxStore(tmp_path / "MBX", "MBX").ensure("b@t.example")
    assert stat.S_IMODE((tmp_path / "MBX").stat().st_mode) == 0o700
    assert stat.S_IMODE(base.stat().st_mode) == 0o700
