"""A hub for unit tests of the stages' rules (real stage code over any queue implementation), and
what the tests of the send connectors share."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field

from mailyard.directory import Directory
from mailyard.hub.queues import MailQueues, Worker
from mailyard.hub.records import Message, new_message_id
from mailyard.internet.sink import Sink
from mailyard.org import Organization, TransportSettings
from mailyard.tracking import Record


@dataclass
class StaticHub:
    """What a stage needs of its hub (mailyard.hub.node.Hub), with a fixed organization."""

    queues: MailQueues
    org: Organization
    name: str = "HUB-T1"
    site: str = "Amsterdam"
    _directory: Directory | None = field(default=None, repr=False)

    def directory(self) -> Directory:
        if self._directory is None:
            self._directory = Directory(self.org)
        return self._directory

    @property
    def settings(self) -> TransportSettings:
        return self.org.transport

    @property
    def fqdn(self) -> str:
        return f"{self.name.lower()}.contoso.com"

    @property
    def worker(self) -> Worker:
        return Worker(self.name, os.getpid())

    def crash_point(self, name: str) -> None:
        pass


def message(sender: str = "alice@contoso.com", *, subject: str = "hello", expires_in_ms: int = 86_400_000,
            now: int, site: str = "Amsterdam") -> Message:
    return Message(id=new_message_id(), sender=sender, message_id=f"<{subject.replace(' ', '-')}@test>",
                   subject=subject, size=100, received=now, expires=now + expires_in_ms, source="SMTP",
                   site=site, hub="HUB-T1")


def record(msg: Message) -> Record:
    return Record("RECEIVE", source="SMTP", server="HUB-T1", sender=msg.sender, subject=msg.subject)


def tag(label: str) -> str:
    """A subject no other test uses."""
    return f"{label} {uuid.uuid4().hex[:6]}"


def at_sink(sink: Sink, domain: str, subject: str) -> list[dict]:
    """The messages with ``subject`` that ``sink`` received for ``domain``."""
    return [m for m in sink.messages(domain) if m["subject"] == subject]
