"""A mailbox server's store: one Maildir++ per mailbox, on the server's own disk.

Layout under the data directory: ``<address>/`` is the mailbox's Maildir (its Inbox) with
the subfolders ``.Outbox`` and ``.Sent Items``, readable by any Maildir tool (and by the
standard library's ``mailbox.Maildir``). Every write goes to ``tmp/``, is fsynced, then
renamed into place, so nothing is ever half-written. A message is stored in a folder once:
per hub delivery key (a hub retrying after a crash) and per Message-ID within the duplicate
detection window, whatever path brought it; the marker is the file's own name
(mailyard.mailbox.dedup).

Mail is for its mailbox's eyes only: every directory is created 0700 and every file 0600
(with that mode from the start, never a chmod afterwards); a directory of an older store that
others may enter is tightened to 0700 on the first use of its mailbox.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Any

from mailyard.errors import NotFoundError
from mailyard.headers import first_value, shown_addresses, shown_text
from mailyard.mailbox import dedup
from mailyard.org import TransportSettings

FOLDERS = {"Inbox": "", "Outbox": ".Outbox", "Sent Items": ".Sent Items", "Junk Email": ".Junk Email"}
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# The scopes of duplicate detection: the Inbox, and a client's "Send" (its item moves from the
# Outbox to Sent Items when a hub picks it up).
INBOX: tuple[str, ...] = ("Inbox", "Junk Email")
JUNK: tuple[str, ...] = ("Junk Email", "Inbox")  # (where an Edge's content filter put it: SCL)
SENT: tuple[str, ...] = ("Outbox", "Sent Items")
SCL_HEADER = b"X-Mailyard-SCL"  # an Edge's spam confidence level, 0-9 (mailyard.hub.content_filter)
DIR_MODE = 0o700
FILE_MODE = 0o600


@dataclass(frozen=True)
class ItemInfo:
    id: str
    folder: str
    message_id: str
    sender: str
    to: list[str]
    cc: list[str]
    subject: str
    date: str
    size: int
    seen: bool

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "folder": self.folder,
            "message_id": self.message_id,
            "from": self.sender,
            "to": self.to,
            "cc": self.cc,
            "subject": self.subject,
            "date": self.date,
            "size": self.size,
            "seen": self.seen,
        }


def folder_name(name: str) -> str:
    """The canonical folder name, case-insensitively (``inbox`` -> ``Inbox``)."""
    for known in FOLDERS:
        if known.lower() == name.strip().lower():
            return known
    raise NotFoundError(f"no folder {name!r}: folders are {', '.join(FOLDERS)}")


def _mkdir(path: Path) -> None:
    """A directory of mode 0700 (an existing one that others may enter is tightened)."""
    try:
        path.mkdir(mode=DIR_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise
        if path.stat().st_mode & 0o077:
            os.chmod(path, DIR_MODE)


def _open_new(path: Path, mode: str = "wb") -> IO[Any]:
    """A file for writing, created 0600 (truncated if it is there)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    return os.fdopen(fd, mode)


def _rename_or_drop(tmp: Path, target: Path) -> None:
    try:
        os.rename(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _DirSync:
    """Group commit of one directory's fsync: a writer whose rename is done waits for an
    fsync of the directory that began after it, and runs one itself if none is under way, so
    writers that renamed while one ran share the next (one fsync for all of them, not one
    each). The error of the fsync that covered a writer is raised to that writer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._started = 0  # fsyncs begun (numbered from 1), one at a time
        self._done = 0  # the last fsync finished
        self._failed: dict[int, OSError] = {}  # (kept a while: its writers wake to read it)

    def sync(self) -> None:
        with self._cond:
            mine = self._started + 1  # the first fsync to begin after this writer's rename
            while self._done < mine:
                if self._started == self._done:  # none under way: this writer runs the next one
                    self._started += 1
                    number = self._started
                    self._cond.release()
                    try:
                        _fsync_dir(self.path)
                        error = None
                    except OSError as exc:
                        error = exc
                    finally:
                        self._cond.acquire()
                    self._done = number
                    if error is not None:
                        self._failed[number] = error
                        for old in [n for n in self._failed if n < number - 10_000]:
                            del self._failed[old]
                    self._cond.notify_all()
                else:
                    self._cond.wait()
            if mine in self._failed:
                raise self._failed[mine]


class MailboxStore:
    """The Maildirs of the mailboxes one server holds."""

    def __init__(self, root: Path, server: str,
                 settings: Callable[[], TransportSettings] = TransportSettings) -> None:
        self.root = Path(root)
        self.server = server
        self._settings = settings  # (read per message: `org apply` changes the window live)
        self._host = socket.gethostname().replace("/", "_").replace(":", "_") or "mailyard"
        self._seq = 0
        self._lock = threading.Lock()
        self._mailbox_locks: dict[str, threading.Lock] = {}
        self._ready: set[str] = set()
        # per mailbox and set of folders (the Inbox's scope and Junk Email's are one index)
        self._indexes: dict[tuple[str, frozenset[str]], dedup.Index] = {}
        self._dir_syncs: dict[Path, _DirSync] = {}
        self.root.parent.mkdir(parents=True, exist_ok=True)
        _mkdir(self.root)

    # region: layout

    def _maildir(self, address: str) -> Path:
        # The address has been checked against the directory by the caller; this is a second
        # line of defence against path tricks.
        if "/" in address or "\\" in address or address.startswith(".") or "\x00" in address:
            raise NotFoundError(f"no mailbox {address!r}")
        return self.root / address.lower()

    def _folder_dir(self, address: str, folder: str) -> Path:
        return self._maildir(address) / FOLDERS[folder_name(folder)]

    def ensure(self, address: str) -> None:
        """Create the mailbox's Maildir and folders if missing; recover after a crash.

        Done once per mailbox and process: the first call after a start is the recovery."""
        if address in self._ready:
            return
        base = self._maildir(address)
        _mkdir(base)
        for sub in FOLDERS.values():
            if sub:
                _mkdir(base / sub)
            for part in ("tmp", "new", "cur"):
                _mkdir(base / sub / part)
            if sub:
                (base / sub / "maildirfolder").touch(mode=FILE_MODE, exist_ok=True)
        # A crash can leave a partial write in tmp/ (never visible, never counted): clear it.
        for sub in FOLDERS.values():
            for leftover in (base / sub / "tmp").iterdir():
                leftover.unlink(missing_ok=True)
        self._ready.add(address)

    # endregion

    def _lock_for(self, address: str) -> threading.Lock:
        with self._lock:
            return self._mailbox_locks.setdefault(address, threading.Lock())

    def _new_id(self, now: float, key: str | None = None, message_digest: str | None = None) -> str:
        if key:
            unique = f"Y{key}"
        else:
            with self._lock:
                self._seq += 1
                seq = self._seq
            unique = f"M{int(now * 1e6) % 1_000_000}P{os.getpid()}Q{seq}"
        return dedup.item_name(int(now), unique, message_digest, self._host)

    def _dir_sync(self, directory: Path) -> _DirSync:
        with self._lock:
            found = self._dir_syncs.get(directory)
            if found is None:
                found = self._dir_syncs[directory] = _DirSync(directory)
            return found

    def _write_tmp(self, folder_dir: Path, raw: bytes) -> Path:
        """The message in the folder's tmp/, fsynced (under a name of its own: the item's is
        chosen when it goes into new/)."""
        tmp = folder_dir / "tmp" / self._new_id(time.time())
        try:
            with _open_new(tmp) as fh:
                fh.write(raw)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        return tmp

    def put(self, address: str, folder: str, raw: bytes) -> str:
        """Store a message in a folder (Outbox for "Send"); returns its id once durable."""
        folder_dir = self._folder_dir(address, folder)
        tmp = self._write_tmp(folder_dir, raw)
        item_id = self._new_id(time.time())
        _rename_or_drop(tmp, folder_dir / "new" / item_id)
        self._dir_sync(folder_dir / "new").sync()
        return item_id

    def submit(self, address: str, message_id: str, raw: bytes) -> tuple[str, bool]:
        """"Send": store in the Outbox once per Message-ID (within the window, in the Outbox or,
        picked up since, in Sent Items); returns (item id, False if a client sent this message
        before and retries after a lost answer)."""
        return self._store_once(address, SENT, raw, None, dedup.digest(message_id))

    def deliver(self, address: str, key: str, raw: bytes) -> tuple[str, bool]:
        """Deliver to the Inbox once per ``key`` and per Message-ID within the window; returns
        (item id, False if a duplicate: the one stored before)."""
        result = self.deliver_many([(address, key, raw)])[0]
        if isinstance(result, OSError):
            raise result
        return result

    def deliver_many(self, messages: list[tuple[str, str, bytes]]) -> list[tuple[str, bool] | OSError]:
        """``deliver`` for a batch of (mailbox, key, message): each file fsynced, and each
        directory once for the whole batch (group commit); a result per message, in order, or
        the OSError that kept it from being durable (each of those is safe to retry)."""
        for _, key, _ in messages:
            if not _KEY.match(key):
                raise ValueError(f"bad delivery key {key!r}")
        junk = self._settings().scl_junk_threshold
        return self._store_each([(JUNK if _scl(raw) > junk else INBOX, address, raw, key, dedup.digest_of(raw))
                                 for address, key, raw in messages])

    def submit_many(self, address: str, messages: list[tuple[str, bytes]]) -> list[tuple[str, bool] | OSError]:
        """``submit`` for several (Message-ID, message) of one mailbox, group-committed as
        ``deliver_many`` is; a result per message, in order, or the OSError that kept it out."""
        return self._store_many(SENT, [(address, raw, None, dedup.digest(message_id)) for message_id, raw in messages])

    def _store_many(self, scope: tuple[str, ...], messages: list[tuple[str, bytes, str | None, str | None]]
                    ) -> list[tuple[str, bool] | OSError]:
        return self._store_each([(scope, *m) for m in messages])

    def _store_each(self, messages: list[tuple[tuple[str, ...], str, bytes, str | None, str | None]]
                    ) -> list[tuple[str, bool] | OSError]:
        placed: list[tuple[str, bool, Path] | OSError] = []
        for scope, address, raw, key, message_digest in messages:
            try:
                placed.append(self._place(address, scope, raw, key, message_digest))
            except OSError as exc:
                placed.append(exc)
        synced: dict[Path, OSError | None] = {}
        for entry in placed:
            if not isinstance(entry, OSError) and entry[2] not in synced:
                try:
                    self._dir_sync(entry[2]).sync()
                    synced[entry[2]] = None
                except OSError as exc:
                    synced[entry[2]] = exc
        return [entry if isinstance(entry, OSError) else synced[entry[2]] or (entry[0], entry[1])
                for entry in placed]

    def _store_once(self, address: str, scope: tuple[str, ...], raw: bytes, key: str | None,
                    message_digest: str | None) -> tuple[str, bool]:
        item_id, fresh, directory = self._place(address, scope, raw, key, message_digest)
        self._dir_sync(directory).sync()
        return item_id, fresh

    def _place(self, address: str, scope: tuple[str, ...], raw: bytes, key: str | None,
               message_digest: str | None) -> tuple[str, bool, Path]:
        """Put the message into the first folder of ``scope`` unless a copy is there (within the
        windows): (item id, False if that copy, the directory to fsync before it counts).

        Only the check and the rename hold the mailbox's lock: the file's own fsync before it,
        and the directory's after it, overlap with other writers (group commit)."""
        self.ensure(address)
        windows = dedup.Windows.of(self._settings())
        with self._lock_for(address):  # a retry finds its first copy without writing anything
            found = self._stored_copy(address, scope, key, message_digest, windows)
        if found:
            return found[0], False, found[1].parent
        folder_dir = self._folder_dir(address, scope[0])
        tmp = self._write_tmp(folder_dir, raw)
        with self._lock_for(address):
            found = self._stored_copy(address, scope, key, message_digest, windows)  # (meanwhile?)
            if found:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                return found[0], False, found[1].parent
            now = time.time()  # (taken under the lock: the index stays in the order stored)
            index = self._index(address, scope, windows, now)
            item_id = self._new_id(now, key, message_digest)
            index.trim(now, windows)
            _rename_or_drop(tmp, folder_dir / "new" / item_id)
            # In the folder now, whatever happens next: counted before the directory's fsync,
            # which may fail (EIO) and be answered 4xx; the retry then finds it.
            index.add(item_id, now, key, message_digest)
        return item_id, True, folder_dir / "new"

    def _index(self, address: str, scope: tuple[str, ...], windows: dedup.Windows, now: float) -> dedup.Index:
        index = self._indexes.get((address, frozenset(scope)))
        if index is None:  # the first use since the start: from the folder's names
            index = dedup.build([self._folder_dir(address, f) for f in scope], windows, now)
            self._indexes[(address, frozenset(scope))] = index
        return index

    def _stored_copy(self, address: str, scope: tuple[str, ...], key: str | None, message_digest: str | None,
                     windows: dedup.Windows) -> tuple[str, Path] | None:
        """The copy stored within the windows, by key or Message-ID (the mailbox's lock held)."""
        now = time.time()
        index = self._index(address, scope, windows, now)
        for table, value, window in ((index.by_key, key, windows.key),
                                     (index.by_digest, message_digest, windows.message_id)):
            seen = table.get(value) if value else None
            if seen and (path := self._still_there(address, scope, seen[0], now - window)):
                return seen[0], path
        return None

    def _still_there(self, address: str, scope: tuple[str, ...], item_id: str, since: float) -> Path | None:
        """The item's file if it is still in the scope's folders, stored after ``since`` (its
        mtime: a copy the user deleted, or older than the window, is no duplicate)."""
        def places() -> Iterator[Path]:
            dirs = [self._folder_dir(address, folder) for folder in scope]
            for d in dirs:  # where this store puts it (a few stats), before any listing of cur/
                yield from (d / "new" / item_id, d / "cur" / f"{item_id}:2,S", d / "cur" / f"{item_id}:2,")
            for folder in scope:
                with contextlib.suppress(NotFoundError):
                    yield self.locate(address, folder, item_id)

        for path in places():
            with contextlib.suppress(FileNotFoundError):  # (or moved meanwhile: Outbox to Sent Items)
                return path if path.stat().st_mtime >= since else None
        return None

    def locate(self, address: str, folder: str, item_id: str) -> Path:
        if not _ID.match(item_id):
            raise NotFoundError(f"no item {item_id!r} in {folder}")
        folder_dir = self._folder_dir(address, folder)
        path = folder_dir / "new" / item_id
        if path.exists():
            return path
        cur = folder_dir / "cur"
        for name in os.listdir(cur):
            if name == item_id or name.startswith(item_id + ":"):
                return cur / name
        raise NotFoundError(f"no item {item_id!r} in {folder_name(folder)} of {address}")

    def read(self, address: str, folder: str, item_id: str) -> bytes:
        return self.locate(address, folder, item_id).read_bytes()

    def move(self, address: str, item_id: str, src: str, dst: str, *, seen: bool = True) -> None:
        """Move an item between folders (Outbox -> Sent Items), atomically by rename."""
        if not self.move_many([(address, item_id)], src, dst, seen=seen):
            raise NotFoundError(f"no item {item_id!r} in {folder_name(src)} of {address}")

    def move_many(self, items: list[tuple[str, str]], src: str, dst: str, *,
                  seen: bool = True) -> list[tuple[str, str]]:
        """Move several (mailbox, item) between folders: each by rename, and each directory
        fsynced once for all of them (a pickup's batch leaving the Outboxes). Returns those
        moved; an item not in ``src`` is left out."""
        touched: set[Path] = set()
        moved = []
        for address, item_id in items:
            try:
                path = self.locate(address, src, item_id)
            except NotFoundError:
                continue
            dst_dir = self._folder_dir(address, dst) / "cur"
            os.rename(path, dst_dir / (item_id + (":2,S" if seen else ":2,")))
            touched.update((dst_dir, path.parent))
            moved.append((address, item_id))
        for directory in touched:
            self._dir_sync(directory).sync()
        return moved

    def has(self, address: str, folder: str, item_id: str) -> bool:
        try:
            self.locate(address, folder, item_id)
            return True
        except NotFoundError:
            return False

    def ids(self, address: str, folder: str) -> list[str]:
        folder_dir = self._folder_dir(address, folder)
        out = []
        for part in ("new", "cur"):
            out += [name.split(":")[0] for name in os.listdir(folder_dir / part)]
        return sorted(out)

    def list(self, address: str, folder: str) -> list[ItemInfo]:
        folder = folder_name(folder)
        folder_dir = self._folder_dir(address, folder)
        parser = BytesHeaderParser(policy=default_policy)
        items = []
        for part in ("new", "cur"):
            for name in os.listdir(folder_dir / part):
                path = folder_dir / part / name
                try:
                    with open(path, "rb") as fh:
                        headers = parser.parse(fh)
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue  # moved meanwhile
                item_id, _, info = name.partition(":")
                items.append(
                    ItemInfo(
                        id=item_id,
                        folder=folder,
                        message_id=shown_text(headers, "Message-ID").strip(),
                        sender=(shown_addresses(headers, "From") or [""])[0],
                        to=shown_addresses(headers, "To"),
                        cc=shown_addresses(headers, "Cc"),
                        subject=shown_text(headers, "Subject"),
                        date=_iso_date(shown_text(headers, "Date")),
                        size=size,
                        seen="S" in info.partition(",")[2],
                    )
                )
        items.sort(key=lambda i: (i.date, i.id))
        return items


def _iso_date(value: str) -> str:
    try:
        return parsedate_to_datetime(value).isoformat()
    except Exception:  # TypeError, ValueError, IndexError, OverflowError (a year of 11 digits)...
        return ""


def _scl(raw: bytes) -> int:
    """The spam confidence level an Edge stamped (-1: none; hubs take it only from an Edge)."""
    value = first_value(raw, SCL_HEADER.decode())
    try:
        return int(value) if value is not None else -1
    except ValueError:
        return -1
