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
    except ValueError as exc:
        raise SiteError(f"{path} is not valid JSON: {exc}") from None


def resolve_redis_url(redis_url: str | None, data_dir: Path) -> str:
    if redis_url:
        return redis_url
    state = read_state(data_dir)
    if state and state.get("redis_url"):
        return str(state["redis_url"])
    raise SiteError(
        f"no site found: {data_dir / STATE_FILE} does not exist. Start one with "
        "`mailyard site up`, or pass --redis-url / set MAILYARD_REDIS_URL."
    )


def connect(redis_url: str | None, data_dir: Path) -> redis.Redis:
    url = resolve_redis_url(redis_url, data_dir)
    r = redisconn.connect(url)
    try:
        r.ping()
    except redis.RedisError as exc:
        raise SiteError(f"cannot reach Redis at {url}: {exc}") from None
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
