"""Mailyard's exceptions.

    MailyardError
     ├── ConfigError            a bad organization file or setting; names the key (and line)
     ├── NotFoundError          a mailbox, folder, item, queue or message that does not exist
     ├── StateError             an action that the object's state does not allow
     ├── SiteError              the local site cannot be found or started
     └── DeliveryError          one delivery attempt failed; carries the SMTP-style reply
          ├── TransientDeliveryError   4xx or a connection failure: retry later
          └── PermanentDeliveryError   5xx: the recipient gets an NDR
"""

from __future__ import annotations

from dataclasses import dataclass


class MailyardError(Exception):
    """Base of every error Mailyard raises on purpose."""


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a configuration: where (dotted key and line) and what."""

    key: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.key}: {self.message}"


class ConfigError(MailyardError):
    """The organization file or a setting is invalid."""

    def __init__(self, problems: list[ConfigProblem], source: str = "") -> None:
        self.problems = problems
        self.source = source
        head = f"{source}: " if source else ""
        lines = [str(p) for p in problems]
        if len(lines) == 1:
            super().__init__(head + lines[0])
        else:
            super().__init__(head + f"{len(lines)} problems:\n  " + "\n  ".join(lines))


class NotFoundError(MailyardError):
    """The named object does not exist."""


class StateError(MailyardError):
    """The object exists, but its state does not allow the action."""


class SiteError(MailyardError):
    """The local site cannot be found, started or reached."""


def smtp_reply(code: int, status: str, text: str) -> str:
    """``code status text`` as one reply line, the status once: a peer's text often starts
    with it already ("5.5.2 Line too long"), and "500 5.5.2 5.5.2 ..." says it twice."""
    if status and (text == status or text.startswith(status + " ")):
        text = text[len(status):].lstrip()
    return f"{code} {status} {text}".strip()


class DeliveryError(MailyardError):
    """A delivery attempt failed. ``code`` and ``status`` are SMTP-style (451, "4.4.1")."""

    def __init__(self, code: int, status: str, text: str) -> None:
        self.code = code
        self.status = status
        self.text = text
        super().__init__(smtp_reply(code, status, text))


class TransientDeliveryError(DeliveryError):
    """4xx or a failed connection: the attempt is retried on the transport schedule."""


class PermanentDeliveryError(DeliveryError):
    """5xx: the recipients it concerns get a non-delivery report."""
