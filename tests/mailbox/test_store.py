"""The mailbox store: Maildir++ on disk, durable writes, idempotent delivery."""

from __future__ import annotations

import errno
import mailbox as stdlib_mailbox
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailyard.errors import NotFoundError
from mailyard.mailbox.store import MailboxStore
from mailyard.org import TransportSettings

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
    assert sorted(md.list_folders()) == ["Junk Email", "Outbox", "Sent Items"]
    assert [m["Subject"] for m in md.get_folder("Outbox")] == ["out"]


def test_delivery_is_idempotent_per_message(store) -> None:
    first, fresh = store.deliver("b@t.example", "msg1", RAW)
    again, fresh_again = store.deliver("b@t.example", "msg1", RAW)
    assert fresh and not fresh_again and first == again
    assert len(store.list("b@t.example", "Inbox")) == 1


def test_a_message_on_disk_counts_after_a_restart_and_partial_writes_are_cleared(tmp_path) -> None:
    s = MailboxStore(tmp_path / "MBX", "MBX")
    s.ensure("b@t.example")
    s.deliver("b@t.example", "msg2", RAW)  # the process dies before the hub hears of it
    base = tmp_path / "MBX" / "b@t.example"
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


# region: duplicate detection (mailyard.mailbox.dedup)

DAY = 86400.0


def with_id(message_id: str, subject: str = "hi") -> bytes:
    return RAW.replace(b"<1@t>", message_id.encode()).replace(b"Subject: hi", f"Subject: {subject}".encode())


def windowed(root: Path, window: float = 2 * DAY) -> MailboxStore:
    s = MailboxStore(root, "MBX", lambda: TransportSettings(duplicate_detection_window=window))
    s.ensure("b@t.example")
    return s


def inbox_files(root: Path) -> list[str]:
    base = root / "b@t.example"
    return sorted(os.listdir(base / "new") + os.listdir(base / "cur"))


def test_the_same_message_id_brought_by_another_hub_or_path_is_stored_once(store) -> None:
    first, fresh = store.deliver("b@t.example", "hubA1", RAW)
    # another hub's copy (its own key, its own Received, the Message-ID folded elsewhere)
    other = b"Received: from hub-b by mbx\r\n" + RAW.replace(b"Message-ID: <1@t>", b"Message-ID:\r\n <1@t>")
    again, fresh_again = store.deliver("b@t.example", "hubB7", other)
    assert fresh and not fresh_again and again == first
    _, another = store.deliver("b@t.example", "hubB8", with_id("<2@t>"))
    assert another, "another Message-ID is another message"
    assert [i.message_id for i in store.list("b@t.example", "Inbox")] == ["<1@t>", "<2@t>"]


def test_outside_the_window_the_same_message_id_is_stored_again(tmp_path) -> None:
    s = windowed(tmp_path / "MBX")
    s.deliver("b@t.example", "k1", RAW)
    (name,) = inbox_files(tmp_path / "MBX")
    three_days_ago = time.time() - 3 * DAY
    os.utime(tmp_path / "MBX" / "b@t.example" / "new" / name, (three_days_ago, three_days_ago))
    _, fresh = s.deliver("b@t.example", "k2", RAW)
    assert fresh, "stored 3 days ago, outside the window of 2 days"
    _, fresh = s.deliver("b@t.example", "k3", RAW)
    assert not fresh, "the new copy is in the window"
    assert len(inbox_files(tmp_path / "MBX")) == 2


def test_a_window_of_0_turns_detection_off_but_a_hubs_retry_is_still_stored_once(tmp_path) -> None:
    s = windowed(tmp_path / "MBX", window=0)
    first, _ = s.deliver("b@t.example", "k1", RAW)
    assert s.deliver("b@t.example", "k1", RAW) == (first, False)
    assert s.deliver("b@t.example", "k2", RAW)[1]
    assert len(inbox_files(tmp_path / "MBX")) == 2


def test_a_copy_the_user_deleted_is_no_duplicate(store, tmp_path) -> None:
    store.deliver("b@t.example", "k1", RAW)
    (name,) = inbox_files(tmp_path / "MBX")
    (tmp_path / "MBX" / "b@t.example" / "new" / name).unlink()
    assert store.deliver("b@t.example", "k2", RAW)[1]


def test_a_resent_submission_is_one_outbox_item_also_once_picked_up(store) -> None:
    item, fresh = store.submit("b@t.example", "<s1@t>", with_id("<s1@t>"))
    assert fresh and store.submit("b@t.example", " <s1@t> ", with_id("<s1@t>")) == (item, False)
    store.move("b@t.example", item, "Outbox", "Sent Items")  # a hub picked it up
    assert store.submit("b@t.example", "<s1@t>", with_id("<s1@t>")) == (item, False)
    assert store.ids("b@t.example", "Outbox") == [] and store.ids("b@t.example", "Sent Items") == [item]
    # a message to oneself: the Outbox and the Inbox are folders of their own
    assert store.deliver("b@t.example", "k1", with_id("<s1@t>"))[1]


def test_a_restarted_store_rebuilds_detection_from_the_folders(tmp_path) -> None:
    root = tmp_path / "MBX"
    s = windowed(root)
    delivered, _ = s.deliver("b@t.example", "k1", RAW)
    sent, _ = s.submit("b@t.example", "<s1@t>", with_id("<s1@t>"))
    s.move("b@t.example", sent, "Outbox", "Sent Items")
    # files an older version named (no Message-ID in the name), and another Maildir tool's
    new = root / "b@t.example" / "new"
    (new / f"{int(time.time())}.Yold1.somehost").write_bytes(with_id("<3@t>"))
    (new / "from-another-tool").write_bytes(with_id("<4@t>"))
    restarted = windowed(root)
    assert restarted.deliver("b@t.example", "k1", RAW) == (delivered, False), "by its key"
    assert restarted.deliver("b@t.example", "k2", RAW) == (delivered, False), "by its Message-ID"
    assert restarted.submit("b@t.example", "<s1@t>", with_id("<s1@t>")) == (sent, False)
    assert not restarted.deliver("b@t.example", "k3", with_id("<3@t>"))[1]
    assert not restarted.deliver("b@t.example", "k4", with_id("<4@t>"))[1]
    assert len(inbox_files(root)) == 3


def as_unprivileged(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a forked child, as nobody when the tests run as root (whose writes no
    directory mode stops): its result, or its exception's text raised here."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        try:
            os.close(read)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            result: tuple[str, Any] = ("ok", fn())
        except BaseException as exc:
            result = ("error", f"{type(exc).__name__}: {exc}")
        with os.fdopen(write, "wb") as fh:
            pickle.dump(result, fh)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    status, value = pickle.loads(data)
    assert status == "ok", value
    return value


NOBODY = 65534


@pytest.fixture
def nobodys_dir() -> Iterator[Path]:
    """A directory the unprivileged child may write (the tests' own are root's and 0700)."""
    path = Path(tempfile.mkdtemp(prefix="mailyard-dedup-"))
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.parametrize(
    ("broken", "mode", "when"),
    [
        ("tmp", 0o500, "the message cannot be written (a read-only tmp/)"),
        ("new", 0o500, "it cannot be renamed into the folder (a read-only new/)"),
        ("new", 0o300, "it is in the folder, but the folder's fsync fails (new/ cannot be opened)"),
    ],
)
def test_a_failed_write_never_stores_a_second_copy_across_retries(nobodys_dir, broken, mode, when) -> None:
    def scenario() -> dict[str, Any]:
        s = windowed(nobodys_dir / "MBX")
        s.deliver("b@t.example", "k0", with_id("<0@t>"))  # (the folder's index is built by then)
        inbox = nobodys_dir / "MBX" / "b@t.example"
        os.chmod(inbox / broken, mode)
        errors = []
        for key in ("k1", "k1", "k2"):  # the hub retries after its 451, then another hub's copy
            try:
                s.deliver("b@t.example", key, RAW)
                errors.append("stored")
            except OSError as exc:
                errors.append(errno.errorcode[exc.errno or 0])
        os.chmod(inbox / broken, 0o700)
        return {"errors": errors, "after": s.deliver("b@t.example", "k1", RAW)[1],
                "restarted": windowed(nobodys_dir / "MBX").deliver("b@t.example", "k3", RAW)[1],
                "files": inbox_files(nobodys_dir / "MBX"), "tmp": os.listdir(inbox / "tmp")}

    seen = as_unprivileged(scenario)
    assert seen["errors"] == ["EACCES"] * 3, f"{when}: every attempt fails while it cannot be made durable"
    in_the_folder_already = (broken, mode) == ("new", 0o300)
    assert seen["after"] is not in_the_folder_already, f"{when}: stored by the first attempt, or now"
    assert seen["restarted"] is False and len(seen["files"]) == 2 and seen["tmp"] == [], seen

# endregion


# region: group commit (each file fsynced; a directory's fsync shared)


def count_dir_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from mailyard.mailbox import store as store_module

    real, seen = store_module._fsync_dir, []

    def counting(path: Path) -> None:
        seen.append(f"{path.parent.name}/{path.name}")
        real(path)

    monkeypatch.setattr(store_module, "_fsync_dir", counting)
    return seen


def test_a_batch_delivery_fsyncs_each_inbox_once(store, monkeypatch) -> None:
    store.ensure("c@t.example")
    fsyncs = count_dir_fsyncs(monkeypatch)
    results = store.deliver_many([("b@t.example", "k1", with_id("<a@t>")), ("c@t.example", "k1", with_id("<a@t>")),
                                  ("b@t.example", "k2", with_id("<b@t>")), ("b@t.example", "k1", with_id("<a@t>"))])
    assert [fresh for _, fresh in results] == [True, True, True, False]  # (the last: k1 again, stored once)
    assert sorted(fsyncs) == ["b@t.example/new", "c@t.example/new"]
    assert len(store.list("b@t.example", "Inbox")) == 2


def test_a_failed_directory_fsync_fails_each_message_of_that_inbox_and_a_retry_finds_them(store, monkeypatch) -> None:
    store.ensure("c@t.example")
    from mailyard.mailbox import store as store_module

    real = store_module._fsync_dir

    def failing(path: Path) -> None:
        if path.parent.name == "b@t.example":
            raise OSError(errno.EIO, "Input/output error")
        real(path)

    monkeypatch.setattr(store_module, "_fsync_dir", failing)
    batch = [("b@t.example", "k1", with_id("<a@t>")), ("c@t.example", "k1", with_id("<a@t>"))]
    first = store.deliver_many(batch)
    assert isinstance(first[0], OSError) and first[1] == (first[1][0], True)  # type: ignore[index]
    monkeypatch.setattr(store_module, "_fsync_dir", real)
    again = store.deliver_many(batch)
    assert [fresh for _, fresh in again] == [False, False]  # type: ignore[misc]
    assert len(store.list("b@t.example", "Inbox")) == 1


def test_concurrent_sends_share_directory_fsyncs_and_each_returns_after_one_that_saw_it(
        store, monkeypatch) -> None:
    import threading

    from mailyard.mailbox import store as store_module

    real, listings = store_module._fsync_dir, []

    def slow(path: Path) -> None:
        listings.append(set(os.listdir(path)))  # what this fsync makes durable: the names there as it begins
        time.sleep(0.05)
        real(path)

    monkeypatch.setattr(store_module, "_fsync_dir", slow)
    uncovered: list[str] = []

    def send(n: int) -> None:
        item, fresh = store.submit("b@t.example", f"<{n}@t>", with_id(f"<{n}@t>"))
        if not (fresh and any(item in names for names in listings)):
            uncovered.append(item)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not uncovered, "every Send returns after a directory fsync that began after its rename"
    assert len(store.ids("b@t.example", "Outbox")) == 8
    assert 1 <= len(listings) < 8, f"8 concurrent Sends share the fsyncs of .Outbox/new: {len(listings)}"

# endregion


def test_a_copy_filed_as_junk_is_the_same_message_as_one_for_the_inbox(store: MailboxStore) -> None:
    # Two copies of one message (one Message-ID) through two paths, one with a high SCL: one copy
    # in the mailbox, whichever came first, though the Inbox's index was made before any Junk
    store.deliver("b@t.example", "other", RAW.replace(b"<1@t>", b"<0@t>"))
    junk = RAW.replace(b"Subject: hi", b"X-Mailyard-SCL: 9\r\nSubject: hi")
    first, fresh = store.deliver("b@t.example", "viaedgeA", junk)
    assert fresh and [m.id for m in store.list("b@t.example", "Junk Email")] == [first]
    again, fresh_again = store.deliver("b@t.example", "viaedgeB", RAW)
    assert (again, fresh_again) == (first, False), "the Inbox's copy is the one filed in Junk Email"
    assert len(store.list("b@t.example", "Inbox")) == 1
