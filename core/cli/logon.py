"""How the CLI logs on to mailbox servers (``mailyard send``, ``mailyard mailbox show``).

Who: ``--user`` (or ``$MAILYARD_USER``), a mailbox address or an operator name, with the
password from ``--password-file`` (or ``$MAILYARD_PASSWORD``), else asked for on a terminal.
Without ``--user``, the site's local operator, from ``<data-dir>/secrets.toml`` (or the file
``$MAILYARD_OPERATOR_SECRETS`` names: compose's): only the person who ran ``mailyard site
up`` there can read that file (as only root runs ``postqueue``). The mailbox servers'
certificates are checked against the organization's CA, ``<data-dir>/pki/ca.crt`` (or
``--ca-file`` / ``$MAILYARD_CA_FILE``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import httpx

from mailyard import pki
from mailyard.errors import MailyardError, SiteError
from mailyard.site import secrets as site_secrets

ENV_USER, ENV_PASSWORD, ENV_CA = "MAILYARD_USER", "MAILYARD_PASSWORD", "MAILYARD_CA_FILE"


def logon_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--ca-file", type=click.Path(dir_okay=False, path_type=Path), envvar=ENV_CA,
                      help="The organization's CA certificate (default: <data-dir>/pki/ca.crt).")(fn)
    fn = click.option("--password-file", type=click.Path(dir_okay=False, path_type=Path),
                      help="A file whose first line is the password (else $MAILYARD_PASSWORD, "
                      "else a prompt on a terminal).")(fn)
    return click.option("--user", envvar=ENV_USER,
                        help="Log on as this mailbox (its address) or operator (default: the site's "
                        "local operator, from <data-dir>/secrets.toml).")(fn)


@dataclass(frozen=True)
class Logon:
    user: str
    password: str
    ca_file: Path

    def client(self) -> httpx.Client:
        return httpx.Client(timeout=30, auth=(self.user, self.password), verify=pki.trust_context(self.ca_file))


def resolve(data_dir: Path, user: str | None, password_file: Path | None, ca_file: Path | None) -> Logon:
    ca = ca_file or pki.pki_dir(data_dir) / pki.CA_CERT
    if not ca.exists():
        raise SiteError(f"no CA certificate at {ca}: run the command in the site's directory, or give --ca-file")
    password = _password(password_file)
    if user:
        if password is None:
            if not sys.stdin.isatty():
                raise SiteError(f"no password for {user}: give --password-file or set {ENV_PASSWORD}")
            password = click.prompt(f"password of {user}", hide_input=True, err=True)
        return Logon(user, password, ca)
    path = Path(os.environ.get(site_secrets.ENV_OPERATOR_FILE) or site_secrets.secrets_path(data_dir))
    try:
        values = site_secrets.load(path)
    except SiteError as exc:
        raise SiteError(f"{exc}; to log on as someone else, give --user") from None
    operator = values.get("operator", {})
    if not operator.get("user") or not operator.get("password"):
        raise SiteError(f"no local operator in {path} (only `mailyard site up` makes one, and only its "
                        "owner may read it): give --user and --password-file")
    return Logon(operator["user"], operator["password"], ca)


def _password(password_file: Path | None) -> str | None:
    if password_file is not None:
        try:
            return (password_file.read_text(encoding="utf-8").splitlines() or [""])[0]
        except OSError as exc:
            raise SiteError(f"cannot read {password_file}: {exc.strerror or exc}") from None
    return os.environ.get(ENV_PASSWORD)


def call(client: httpx.Client, server: str, method: str, url: str, *, resend_for: float = 0.0,
         **kw: Any) -> httpx.Response:
    """One request to mailbox server ``server``; an error status becomes a MailyardError.

    ``resend_for`` (seconds), for a request that is safe to repeat (a message with its
    Message-ID): sent again, until answered or for that long, after a 503 or once its answer
    may have been lost (the connection broke, or timed out, after the request went out). A
    server that cannot be reached at all is reported at once."""
    deadline = time.monotonic() + resend_for
    pause, went_out = 0.25, False
    while True:
        try:
            response = client.request(method, url, extensions=pki.sni(pki.Identity.mailbox(server)), **kw)
        except httpx.TransportError as exc:
            went_out = went_out or not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
            if not went_out or time.monotonic() + pause > deadline:
                raise MailyardError(f"cannot reach the mailbox server {server} at {url}: {exc}") from None
        except httpx.HTTPError as exc:
            raise MailyardError(f"cannot reach the mailbox server {server} at {url}: {exc}") from None
        else:
            if response.status_code != 503 or time.monotonic() + pause > deadline:
                break
        time.sleep(pause)
        pause = min(pause * 2, 2.0)
    if response.status_code >= 400:
        try:
            detail = response.json().get("error", response.text)
        except ValueError:
            detail = response.text
        raise MailyardError(f"{response.status_code}: {detail}")
    return response
