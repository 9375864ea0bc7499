"""The site's secrets: one file, ``<data dir>/secrets.toml``, mode 0600.

``mailyard site up`` keeps there every secret it generates (``secrets.token_urlsafe``), and
reads them back on the next start, so a restart keeps the same credentials:

    [flower]            Flower's basic-auth logon
    user = "admin"
    password = "..."

    [viewer]            the Queue Viewer's bearer tokens
    token = "..."       the API (reads and actions) and /metrics
    metrics_token = "..."   /metrics only, for a Prometheus scraper

    [operator]          the local operator's logon on mailbox servers (the CLI's `send`,
    user = "operator"   `mailbox show`): the organization's operator of that name, when the
    password = "..."    organization file gives it no password of its own

    [redis]             the site's Redis (requirepass): every process of the site, and the CLI
    password = "..."    run from this data directory, connect with it

    [edge]              the demo Edge's own Redis (mailyard.site.edge): the Edge only; it
    redis_password = "..."   never has the site's [redis] password

The [redis] password is generated for the embedded Redis of ``site up``; with ``--redis-url``
it is the password of that URL (and absent when it has none). ``site.json`` holds Redis's URL
without it; the CLI adds it from here, so only who may read this file reaches Redis.

Other sections are added here by name as they come: unknown
sections and keys in the file are kept as they are.

A value that is empty or a well-known placeholder (anything containing ``change-me``, or the
demo's ``contoso-demo-viewer-token``) is never used: it is replaced by a generated one. To
rotate a secret, delete its line (or the whole file) and start the site again, or write a
value of your own there.

The file is created with mode 0600 (``os.open(..., 0o600)``, never a chmod afterwards) and
replaced atomically; one that another user may read, or that another user owns, is refused.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from mailyard.errors import SiteError
from mailyard.org import Organization

FILE_NAME = "secrets.toml"
MODE = 0o600
TOKEN_BYTES = 32  # secrets.token_urlsafe: 43 characters of [A-Za-z0-9_-]

# Secrets nobody may use: the demo organization's and compose's placeholders.
PLACEHOLDER_MARKERS = ("change-me", "changeme")
WELL_KNOWN = frozenset({"contoso-demo-viewer-token"})

FLOWER_USER = "admin"
OPERATOR_USER = "operator"


def is_placeholder(value: str | None) -> bool:
    """True for a value that must never work as a secret: empty, or a well-known placeholder."""
    if value is None or not value.strip():
        return True
    lowered = value.strip().lower()
    return lowered in WELL_KNOWN or any(marker in lowered for marker in PLACEHOLDER_MARKERS)


def token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


# (section, key) -> how to make the value when the file has none (or a placeholder).
GENERATED: dict[tuple[str, str], Callable[[], str]] = {
    ("flower", "user"): lambda: FLOWER_USER,
    ("flower", "password"): token,
    ("viewer", "token"): token,
    ("viewer", "metrics_token"): token,
    ("operator", "user"): lambda: OPERATOR_USER,
    ("operator", "password"): token,
    ("redis", "password"): token,
    ("edge", "redis_password"): token,
}
REDIS_PASSWORD = ("redis", "password")


ENV_OPERATOR_FILE = "MAILYARD_OPERATOR_SECRETS"  # the CLI's [operator] elsewhere than <data-dir>


def secrets_path(data_dir: Path) -> Path:
    return Path(data_dir) / FILE_NAME


@dataclass(frozen=True)
class SiteSecrets:
    """The secrets of one site, as kept in ``path``."""

    path: Path
    values: Mapping[str, Mapping[str, str]]

    def get(self, section: str, key: str) -> str:
        try:
            return self.values[section][key]
        except KeyError:
            raise SiteError(f"{self.path}: no [{section}] {key}") from None

    @property
    def flower_basic_auth(self) -> str:
        """``user:password`` as Flower's ``basic_auth`` option takes it."""
        user, password = self.get("flower", "user"), self.get("flower", "password")
        # Flower splits FLOWER_BASIC_AUTH at commas (several logons) and a logon at the first colon.
        if not re.fullmatch(r"[^\s:,]+", user):
            raise SiteError(f"{self.path}: [flower] user must be one word without ':' or ','")
        if "," in password:
            raise SiteError(f"{self.path}: [flower] password must not contain ','")
        return f"{user}:{password}"

    @property
    def viewer_token(self) -> str:
        return self.get("viewer", "token")

    @property
    def metrics_token(self) -> str:
        return self.get("viewer", "metrics_token")

    @property
    def operator(self) -> tuple[str, str]:
        return self.get("operator", "user"), self.get("operator", "password")

    @property
    def edge_redis_password(self) -> str:
        return self.get("edge", "redis_password")

    @property
    def redis_password(self) -> str | None:
        """The site's Redis password, or None when its Redis has none (an external one)."""
        return self.values.get("redis", {}).get("password") or None


def load(path: Path) -> dict[str, dict[str, str]]:
    """The file's sections, or ``{}`` when it does not exist. Refuses a file others may read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise SiteError(f"cannot read {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SiteError(f"{path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise SiteError(f"{path} belongs to another user (uid {st.st_uid}); it holds this site's secrets")
        if st.st_mode & 0o077:
            raise SiteError(f"{path} may be read by other users (mode {stat.S_IMODE(st.st_mode):04o}): "
                            "its secrets may be known; delete it to have new ones generated, "
                            "or `chmod 600` it if nobody else could have read it")
        text = f.read()
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SiteError(f"{path} is not valid TOML: {exc}") from None
    out: dict[str, dict[str, str]] = {}
    for section, table in data.items():
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise SiteError(f"{path}: [{section}] must be a table of strings")
        out[section] = dict(table)
    return out


def _quote(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's, with non-ASCII as \\uXXXX)."""
    return json.dumps(value, ensure_ascii=True).replace("\x7f", "\\u007f")  # (TOML escapes DEL too)


def _bare(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _quote(key)


HEADER = """\
# The secrets of the Mailyard site in this directory, written by `mailyard site up`.
# Only its owner may read this file (mode 0600). To rotate a secret, delete its line (or the
# file) and start the site again, or put a value of your own in its place; an empty value or
# a placeholder containing "change-me" is replaced by a generated one.
"""


def render(values: Mapping[str, Mapping[str, str]]) -> str:
    parts = [HEADER]
    for section, table in values.items():
        parts.append(f"\n[{_bare(section)}]\n")
        parts += [f"{_bare(key)} = {_quote(value)}\n" for key, value in table.items()]
    return "".join(parts)


def write(path: Path, values: Mapping[str, Mapping[str, str]]) -> None:
    """Replace ``path`` atomically with a file created 0600 from the start."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, MODE)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(render(values))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def ensure(data_dir: Path, *, skip: Collection[str] = (),
           set_values: Mapping[tuple[str, str], str | None] | None = None) -> SiteSecrets:
    """The site's secrets: those in its file, and a generated one for each that is missing or a
    placeholder (the file is rewritten only then). Sections in ``skip`` are not generated;
    ``set_values`` are written as given (None: removed), e.g. the password of an external Redis."""
    path = secrets_path(data_dir)
    values = load(path)
    changed = not path.exists()
    forced = dict(set_values or {})
    for (section, key), value in forced.items():
        if values.get(section, {}).get(key) == value:
            continue
        if value is None:
            values[section].pop(key)
            if not values[section]:
                del values[section]
        else:
            values.setdefault(section, {})[key] = value
        changed = True
    for (section, key), make in GENERATED.items():
        if section in skip or (section, key) in forced:
            continue
        if is_placeholder(values.get(section, {}).get(key)):
            values.setdefault(section, {})[key] = make()
            changed = True
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path, values)
    return SiteSecrets(path, values)


MAILBOXES = "mailboxes"  # the section of generated mailbox passwords, keyed by address
DEMO_PASSWORD = "-demo-password"  # the demo organization's mailbox passwords end so


def is_demo_password(value: str) -> bool:
    """A mailbox password the demo file gives (``alice-demo-password``) or a placeholder: known
    to everyone who read the file, so never what a site runs with."""
    return bool(value) and (value.strip().lower().endswith(DEMO_PASSWORD) or is_placeholder(value))


def with_site_passwords(org: Organization, data_dir: Path) -> tuple[Organization, SiteSecrets]:
    """``org`` as a site runs it, and the secrets that made it so: the local operator
    (``[operator] user``) logs on with the password kept here unless the organization file
    gives it one of its own, and every mailbox whose password is the demo's (or a
    placeholder) gets one generated here (``[mailboxes] "<address>"``), kept across starts."""
    kept = ensure(data_dir, skip={"redis", "flower", "viewer"})
    values = {section: dict(table) for section, table in kept.values.items()}
    generated = values.setdefault(MAILBOXES, {})
    wanted = {mb.address for mb in org.mailboxes if is_demo_password(mb.password)}
    fresh = {address: token() for address in wanted if is_placeholder(generated.get(address))}
    if fresh:
        generated.update(fresh)
        write(kept.path, values)
        kept = SiteSecrets(kept.path, values)
    user, password = kept.operator
    operators = [op.model_copy(update={"password": password}) if op.name == user and is_placeholder(op.password)
                 else op for op in org.operators]
    mailboxes = [mb.model_copy(update={"password": generated[mb.address]}) if mb.address in wanted else mb
                 for mb in org.mailboxes]
    return org.model_copy(update={"operators": operators, "mailboxes": mailboxes}), kept
