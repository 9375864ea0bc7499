"""Recipient lookup and group expansion over the organization (the categorizer's resolver).

Pure logic over an ``Organization``: no Redis, no I/O. The hub's categorizer and its
receive connectors share it, so RCPT-time checks and categorization cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from mailyard.addresses import canonical
from mailyard.org import Organization


class Kind(StrEnum):
    MAILBOX = "Mailbox"
    GROUP = "Group"
    CONTACT = "Contact"
    EXTERNAL = "External"


@dataclass(frozen=True)
class Entry:
    """One directory object an address resolves to."""

    kind: Kind
    address: str  # the primary address (for a contact: its external address)
    server: str | None = None
    site: str | None = None


@dataclass(frozen=True)
class Final:
    """A recipient after resolution and expansion: where the message must go."""

    address: str
    kind: Kind
    original: str  # the address as the sender wrote it (ORCPT), or the group it came from
    server: str | None = None
    site: str | None = None


@dataclass
class Expansion:
    finals: list[Final] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # in an accepted domain, not found
    resolved: list[tuple[str, str]] = field(default_factory=list)  # (alias, primary): RESOLVE
    expanded: list[tuple[str, list[str]]] = field(default_factory=list)  # (group, members)


@dataclass(frozen=True)
class Principal:
    """Someone logged on: a mailbox (``name`` its primary address) or an operator."""

    kind: str  # "mailbox" or "operator"
    name: str

    def __str__(self) -> str:
        return self.name if self.kind == "mailbox" else f"operator {self.name}"


class Directory:
    """Indexes of one organization version."""

    def __init__(self, org: Organization) -> None:
        self.org = org
        self.accepted_domains = frozenset(org.accepted_domains)
        # An Edge's copy (mailyard.edgesync): it knows the organization's recipients only as
        # hashes, checked at RCPT; an address of an accepted domain is routed by its domain.
        self.edge = org.edge is not None
        self.site_of_server = {srv: s.name for s in org.sites for srv in s.mailbox_servers}
        self._entries: dict[str, Entry] = {}
        self._groups: dict[str, list[str]] = {g.address: list(g.members) for g in org.groups}
        self._closed_groups = {g.address for g in org.groups if g.require_sender_authentication}
        for mb in org.mailboxes:
            entry = Entry(Kind.MAILBOX, mb.address, mb.server, self.site_of_server.get(mb.server))
            self._entries[mb.address] = entry
            for alias in mb.aliases:
                self._entries[alias] = entry
        for group in org.groups:
            self._entries[group.address] = Entry(Kind.GROUP, group.address)
        for contact in org.contacts:
            entry = Entry(Kind.CONTACT, contact.external_address)
            self._entries.setdefault(contact.external_address, entry)
            if contact.address:
                self._entries[contact.address] = entry
        # Each mailbox's password hash, as `mailyard org apply` stored it (check with passwords.verify).
        self.password_hashes = {mb.address: mb.password for mb in org.mailboxes if mb.password}
        self._operators = {op.name: op for op in org.operators}
        self._mailboxes = {mb.address: mb for mb in org.mailboxes}

    # region: who logs on, and what they may do (the mailbox API; SMTP has its own in the hub)

    def principal(self, login: str) -> tuple[Principal, str] | None:
        """Who a login names (a mailbox by its address or an alias, or an operator by its name)
        and the password hash to check, or None (unknown, or no password: cannot log on)."""
        if "@" in login:
            entry = self.mailbox_entry(login)
            stored = self.password_hashes.get(entry.address, "") if entry else ""
            return (Principal("mailbox", entry.address), stored) if entry and stored else None
        op = self._operators.get(login)
        return (Principal("operator", op.name), op.password) if op and op.password else None

    def may(self, who: Principal, right: str, address: str) -> bool:
        """Does ``who`` hold ``right`` (FullAccess, SendAs, SendOnBehalf) on the mailbox
        ``address`` (a primary address)? A mailbox holds every right on itself."""
        if who.kind == "operator":
            op = self._operators.get(who.name)
            return op is not None and right in op.rights
        if who.name == address:
            return True
        mb = self._mailboxes.get(address)
        granted = {"FullAccess": mb.full_access, "SendAs": mb.send_as,
                   "SendOnBehalf": mb.send_on_behalf}.get(right, []) if mb else []
        return who.name in granted

    def send_as_refusal(self, who: Principal, senders: list[str], sender_field: list[str]) -> str | None:
        """Why ``who`` may not send a message whose ``From`` addresses are ``senders`` and whose
        ``Sender`` addresses are ``sender_field``, or None if it may (the one rule of the
        mailbox API and of SMTP submission).

        Each From address must be ``who``'s own mailbox, a mailbox it has SendAs on, or one it
        has SendOnBehalf on when the message names ``who`` as its Sender. A Sender must be
        ``who`` (or a mailbox it may send as); several From addresses need a Sender (RFC 5322
        3.6.2). An address outside the organization's mailboxes is no one's to send as."""
        own = self.addresses_of(who.name) if who.kind == "mailbox" else frozenset()
        senders, sender_field = [canonical(a) for a in senders], [canonical(a) for a in sender_field]
        for address in sender_field:
            if address not in own and not self.may_on(who, "SendAs", address):
                return f"{who} may not send with Sender {address}: not its own address"
        for address in senders:
            if address in own or self.may_on(who, "SendAs", address):
                continue
            if own and sender_field and set(sender_field) <= own and self.may_on(who, "SendOnBehalf", address):
                continue
            return f"{who} may not send as {address or '(an empty From)'}"
        if len(senders) > 1 and not sender_field:
            return "a message with several From addresses needs a Sender (RFC 5322 3.6.2)"
        return None

    def may_on(self, who: Principal, right: str, address: str) -> bool:
        """``may`` for the mailbox an address (or alias) names; False for any other address."""
        entry = self.mailbox_entry(address)
        return entry is not None and self.may(who, right, entry.address)

    def addresses_of(self, address: str) -> frozenset[str]:
        """A mailbox's primary address and its aliases."""
        mb = self._mailboxes.get(address)
        return frozenset({address, *(mb.aliases if mb else ())})

    # endregion

    def is_accepted(self, address: str) -> bool:
        return canonical(address).rpartition("@")[2].rstrip(".") in self.accepted_domains

    def lookup(self, address: str) -> Entry | None:
        """The directory entry of an address, or None (unknown or outside the organization).
        Any spelling of an address finds it: any case, and an IDN's A-labels or U-labels."""
        return self._entries.get(canonical(address))

    def requires_sender_authentication(self, address: str) -> bool:
        """Whether only a sender that proved who it is may send to ``address``: a group with
        RequireSenderAuthenticationEnabled, or a group with one nested in it (anywhere: an
        open group must not be a way into a closed one; refused whole, at RCPT, rather than
        bounced in part later)."""
        seen: set[str] = set()
        todo = [address.lower()]
        while todo:
            group = self.lookup(todo.pop())
            if group is None or group.kind is not Kind.GROUP or group.address in seen:
                continue
            if group.address in self._closed_groups:
                return True
            seen.add(group.address)
            todo.extend(self._groups.get(group.address, []))
        return False

    def mailbox_entry(self, address: str) -> Entry | None:
        entry = self.lookup(address)
        return entry if entry and entry.kind is Kind.MAILBOX else None

    def servers_in_site(self, site: str) -> list[str]:
        return [srv for srv, s in self.site_of_server.items() if s == site]

    def expand(self, addresses: list[str]) -> Expansion:
        """Resolve envelope recipients: aliases to primaries, groups to members, recursively.

        Every final recipient appears once, whatever the nesting; a group that contains itself
        (directly or through others) is expanded once and the loop ends there.
        """
        out = Expansion()
        seen_final: set[str] = set()
        seen_group: set[str] = set()

        def add(address: str, original: str) -> None:
            lowered = canonical(address)
            entry = self._entries.get(lowered)
            if entry is None:
                if self.is_accepted(lowered) and not self.edge:
                    if lowered not in out.unknown:
                        out.unknown.append(lowered)
                    return
                entry = Entry(Kind.EXTERNAL, lowered)
            if entry.kind is Kind.GROUP:
                if entry.address in seen_group:
                    return
                seen_group.add(entry.address)
                members = self._groups.get(entry.address, [])
                out.expanded.append((entry.address, list(members)))
                for member in members:
                    add(member, entry.address)
                return
            if entry.address != lowered and entry.kind is Kind.MAILBOX:
                out.resolved.append((lowered, entry.address))
            if entry.address in seen_final:
                return
            seen_final.add(entry.address)
            out.finals.append(Final(entry.address, entry.kind, original, entry.server, entry.site))

        for address in addresses:
            add(address, canonical(address))
        return out
