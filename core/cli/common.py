"""What every command shares: finding the site, printing tables and JSON, errors."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from functools import wraps
from pathlib import Path
from typing import Any

import click
import redis

from mailyard import redisconn
from mailyard.errors import MailyardError, SiteError
from mailyard.site import secrets as site_secrets

DEFAULT_DATA_DIR = Path("var")
STATE_FILE = "site.json"


def data_dir_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=lambda: os.environ.get("MAILYARD_DATA_DIR", str(DEFAULT_DATA_DIR)),
        show_default="./var",
        help="The site's data directory (state file, Redis, Maildirs).",
    )(fn)


def redis_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option(
        "--redis-url",
        envvar=redisconn.ENV_URL,
        help="Redis of the site (default: the running local site's, from its state file).",
    )(fn)
    return data_dir_option(fn)


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(fn)


def read_state(data_dir: Path) -> dict[str, Any] | None:
    path = data_dir / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except PermissionError:
        raise SiteError(f"cannot read {path.absolute()}: the site there is another user's") from None
    except ValueError as exc:
        raise SiteError(f"{path} is not valid JSON: {exc}") from None


def site_redis_url(url: str, data_dir: Path) -> str:
    """The URL of the local site's Redis, as site.json has it (without the password), with the
    password of the site's secrets.toml: only who may read that file (the site's operator) gets it."""
    if redisconn.has_password(url):
        return url
    path = site_secrets.secrets_path(data_dir)
    try:
        values = site_secrets.load(path)
    except SiteError:
        if os.access(path, os.F_OK) and os.access(path, os.R_OK):
            raise
        raise SiteError(
            f"cannot read {path.absolute()}: it holds the password of the site's Redis, and only the site's "
            "operator (the user who runs its `mailyard site up`) may read it and act on this site") from None
    password = values.get("redis", {}).get("password")
    return redisconn.with_password(url, password) if password else redisconn.with_password_file(url)


def resolve_redis_url(redis_url: str | None, data_dir: Path) -> str:
    """The Redis URL to use, with its password: ``--redis-url`` / ``MAILYARD_REDIS_URL`` (a URL
    without a password takes the one of ``MAILYARD_REDIS_PASSWORD_FILE``), else the local site's
    (site.json's URL and the password of secrets.toml)."""
    if redis_url:
        return redisconn.with_password_file(redis_url)
    state = read_state(data_dir)
    if state and state.get("redis_url"):
        return site_redis_url(str(state["redis_url"]), data_dir)
    raise SiteError(
        f"no site found: {data_dir / STATE_FILE} does not exist. Start one with "
        "`mailyard site up`, or pass --redis-url / set MAILYARD_REDIS_URL."
    )


def auth_refused(url: str, exc: redis.AuthenticationError, data_dir: Path | None = None) -> SiteError:
    """The error for a Redis that refused us for want of the right password (NOAUTH, WRONGPASS);
    ``data_dir``: the URL is the local site's (site.json and secrets.toml)."""
    hint = None
    if data_dir is not None:
        path = site_secrets.secrets_path(data_dir).absolute()
        if not path.exists():
            hint = (f"the local site's password is in {path} ([redis] password), which does not exist: "
                    "only the site's operator, from the site's data directory, may act on it")
        elif redisconn.has_password(url):
            hint = (f"the [redis] password of {path} is not the one the site's Redis runs with "
                    "(changed since `mailyard site up` started? restart the site)")
    return SiteError(redisconn.refused(url, exc, hint))


def connect(redis_url: str | None, data_dir: Path) -> redis.Redis:
    url = resolve_redis_url(redis_url, data_dir)
    r = redisconn.connect(url)
    try:
        r.ping()
    except redis.AuthenticationError as exc:
        raise auth_refused(url, exc, None if redis_url else data_dir) from None
    except redis.RedisError as exc:
        raise SiteError(f"cannot reach Redis at {redisconn.redacted(url)}: {exc}") from None
    return r


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn Mailyard's errors into a one-line message and exit status 1 (2 for usage)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MailyardError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except redis.AuthenticationError as exc:
            click.echo(f"error: {redisconn.refused('', exc)}", err=True)
            sys.exit(1)
        except redis.RedisError as exc:
            click.echo(f"error: Redis: {exc}", err=True)
            sys.exit(1)

    return wrapper


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> str:
    rows = [["" if v is None else str(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(v)) for w, v in zip(widths, row, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=False)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)).rstrip() for row in rows]
    return "\n".join(lines)
