"""A property-based fuzzer against a running hub's receive connectors, over real sockets.

Hypothesis draws SMTP sessions: valid commands and transactions, commands out of order,
malformed and overlong lines (over 1000 bytes and over 64 KB), NUL and 8-bit bytes, invalid
UTF-8 with and without SMTPUTF8, UTF-8 addresses (RFC 6531: a mailbox's alias in several
spellings, an IDN domain as U-labels and A-labels, look-alike tricks), invalid addresses and
relay tricks, pipelined garbage, AUTH
garbage (bad base64, unknown mechanisms, aborted exchanges), STARTTLS followed by a real
handshake or by garbage, huge headers, and BDAT (RFC 3030): whole transactions in chunks,
chunks whose size says more or less than what follows, malformed sizes, BDAT out of order
and mixed with DATA. Each session is played against ``Default``
(127.0.0.1: no anonymous submission) or ``Internet`` (127.0.0.2: anonymous, mail for existing
contoso.com recipients only).

The client simulates how the server splits the byte stream into lines (LF in commands, CRLF
in DATA, a BDAT chunk's exact size), so it knows which reply answers which line, and checks:

- every reply line is ``ddd<SP or ->text`` with printable ASCII text, and every 4xx/5xx
  reply carries an enhanced status code of its own class;
- no 250 to MAIL or RCPT with a non-ASCII address unless MAIL FROM carried SMTPUTF8;
- every line gets its reply, or the connection is closed, within 10 seconds (never a hang);
- no envelope that must be refused gets through: no 250 to MAIL for an anonymous client on
  Default, no 250 to RCPT for an address that is not an existing contoso.com recipient, no
  354/250 for DATA, and no 250 for BDAT, without an accepted sender and recipient, no 354 in a
  transaction begun with BDAT, and a chunk's reply only once all its octets are sent; afterwards, every message the
  tracking log says was received has only such recipients;
- the receive process is the same process afterwards and still takes a normal message.

The known exceptions to "one reply per line" are modelled: QUIT, 421, the fifth unknown
command and the tenth 5xx to a client not logged on close the connection; after ``220`` to STARTTLS the server discards plaintext and
waits for a handshake; a run of more than 64 KB without CRLF makes the server close
(``hub/receive_protocol.py``, ``MAX_UNBROKEN_LINE``).
"""

from __future__ import annotations

import base64
import itertools
import smtplib
import ssl
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailyard import tracking
from mailyard.addresses import canonical
from mailyard.hub.receive_protocol import MAX_UNBROKEN_LINE
from mailyard.hub.smtp_bdat import parse as parse_bdat
from mailyard.org import Organization
from mailyard.testing.cluster import Cluster
from tests.conftest import make_org
from tests.hostile.helpers import (
    INTERNET_SOURCE,
    RawSession,
    Reply,
    ServerClosed,
    alive,
    receive_errors,
    receive_pid,
    rss_kb,
    running_site,
)


def fuzz_org() -> Organization:
    """The demo organization, where bob also has internationalized aliases (RFC 6531)."""
    data = make_org().model_dump(mode="json")
    data["accepted_domains"].append("bücher.example")
    bob = next(m for m in data["mailboxes"] if m["address"] == "bob@contoso.com")
    bob["aliases"] = [*bob["aliases"], "bøb@contoso.com", "bob@bücher.example"]
    return Organization.model_validate(data)


ORG = fuzz_org()
# Everything that exists in the accepted domain: what an anonymous Internet client may send to.
VALID_RECIPIENTS = frozenset(
    [m.address for m in ORG.mailboxes] + [a for m in ORG.mailboxes for a in m.aliases]
    + [g.address for g in ORG.groups] + [c.address for c in ORG.contacts if c.address]
)
ALICE = frozenset({"alice@contoso.com", "a.anders@contoso.com"})
EXAMPLES = 120  # per connector

CRLF = b"\r\n"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# region: what the fuzzer sends

ADDRESSES = [
    # recipients that exist (on MBX-AMS-01, which this module runs), in several spellings
    b"bob@contoso.com", b"BOB@Contoso.COM", b"alice@contoso.com", b"a.anders@contoso.com",
    # refused: unknown, relay, relay tricks
    b"nobody@contoso.com", b"friend@fabrikam.example", b"friend%fabrikam.example@contoso.com",
    b'"friend@fabrikam.example"@contoso.com', b"@contoso.com:friend@fabrikam.example",
    b"friend@fabrikam.example@contoso.com", b"fabrikam.example!friend@contoso.com", b"friend@[192.0.2.1]",
    b"bob@contoso.com.fabrikam.example", b"bob@contoso.com.", b"bob@contoso.com> <friend@fabrikam.example",
    # malformed
    b"", b"<>", b"bob", b"@", b"bob@", b"@contoso.com", b"bob@@contoso.com", b"bob@contoso..com",
    b"a" * 300 + b"@contoso.com", b"bob@" + b"a" * 300 + b".com", b"bob@contoso.com\x00.evil.example",
    b"bob\x00@contoso.com", b"bob\t@contoso.com", b"(comment)bob@contoso.com",
    # 8-bit: UTF-8 and invalid UTF-8
    b"b\xc3\xb6b@contoso.com", b"bob@c\xc3\xb6ntoso.com", b"\xff\xfe@contoso.com", b"bob@contoso.com\xc0\xaf",
    b"\xe2\x80\xaebob@contoso.com",
    # internationalized (RFC 6531): bob's aliases in several spellings, relay, look-alikes, bad UTF-8
    b"b\xc3\xb8b@contoso.com", b"B\xc3\x98B@Contoso.com", b"bob@b\xc3\xbccher.example", b"BOB@xn--bcher-kva.example",
    b"bob@bu\xcc\x88cher.example", b"j\xc3\xb6rg@fabrikam.example", b"bob@m\xc3\xbcnchen.example",
    b"b\xc3\xb8b@contoso.com\xe2\x80\x8b", b"b\xe2\x80\x8d\xc3\xb8b@contoso.com", b"b\xc3\xb8b\xff@contoso.com",
    b"bob@xn--zz.example", b"\xe7\x94\xa8\xe6\x88\xb7@\xe4\xbe\x8b\xe5\xad\x90.\xe5\xb9\xbf\xe5\x91\x8a",
]
address = st.one_of(st.sampled_from(ADDRESSES), st.binary(max_size=24))
mail_params = st.sampled_from([
    b"", b"", b" SMTPUTF8", b" BODY=8BITMIME", b" BODY=8BITMIME SMTPUTF8", b" SIZE=100", b" SIZE=99999999999",
    b" BODY=BINARYMIME", b" FOO=BAR", b" SMTPUTF8=yes", b" SIZE=", b" SIZE=-1", b" SIZE=1 SIZE=2", b" \xff",
    b" NOTIFY=NEVER", b" AUTH=<>",
])


def envelope(verbs: list[bytes], keyword: bytes) -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda verb, addr, params, angle: verb + b" " + keyword + (b"<" + addr + b">" if angle else addr) + params + CRLF,
        st.sampled_from(verbs), address, mail_params, st.booleans(),
    )


mail = st.one_of(
    envelope([b"MAIL", b"mail", b"MaIl"], b"FROM:"),
    st.sampled_from([b"MAIL FROM:<sender@fabrikam.example>\r\n", b"MAIL FROM:<>\r\n", b"MAIL FROM:<alice@contoso.com>\r\n",
                     b"MAIL FROM:<a.anders@contoso.com> BODY=8BITMIME\r\n", b"MAIL FROM:<s@fabrikam.example> SMTPUTF8\r\n",
                     b"MAIL FROM:<j\xc3\xb6rg@fabrikam.example> SMTPUTF8\r\n", b"MAIL FROM:<j\xc3\xb6rg@fabrikam.example>\r\n"]),
)
rcpt = st.one_of(
    envelope([b"RCPT", b"rcpt"], b"TO:"),
    st.sampled_from([b"RCPT TO:<bob@contoso.com>\r\n", b"RCPT TO:<friend@fabrikam.example>\r\n",
                     b"RCPT TO:<a.anders@contoso.com>\r\n", b"RCPT TO:<nobody@contoso.com>\r\n",
                     b"RCPT TO:<b\xc3\xb8b@contoso.com>\r\n", b"RCPT TO:<bob@xn--bcher-kva.example>\r\n"]),
)
SIMPLE = [
    b"EHLO client.example\r\n", b"HELO client.example\r\n", b"EHLO\r\n", b"EHLO \xff\xfe\r\n", b"ehlo x\n",
    b"RSET\r\n", b"RSET now\r\n", b"NOOP\r\n", b"NOOP \x00\xff\r\n", b"HELP\r\n", b"HELP MAIL\r\n", b"HELP FOO\r\n",
    b"HELP \xff\r\n", b"VRFY <bob@contoso.com>\r\n", b"VRFY \xff\xfe\r\n", b"VRFY\r\n", b"EXPN all-staff\r\n",
    b"DATA\r\n", b"DATA now\r\n", b"BDAT 10 LAST\r\n", b"TURN\r\n", b"ETRN contoso.com\r\n", b"\r\n", b"\n",
    b" \r\n", b"\r\r\n", b"MAIL\r\n", b"RCPT\r\n", b"MAIL FROM\r\n", b"MAIL TO:<bob@contoso.com>\r\n",
    b"RCPT FROM:<x@example.org>\r\n", b"QUIT now\r\n", b"STARTTLS now\r\n", b"MAIL FROM:<x@example.org>\r\n",
    b"RCPT TO:<bob@contoso.com>\r\n", b"\x00\r\n", b"\xff\xfe\xfd\r\n", b"MAIL\x00FROM:<x@example.org>\r\n",
]
simple = st.sampled_from(SIMPLE)
garbage_line = st.builds(lambda data, end: data + end, st.binary(max_size=120), st.sampled_from([CRLF, b"\n"]))
overlong = st.builds(
    lambda prefix, n: prefix + b"x" * n + CRLF,
    st.sampled_from([b"NOOP ", b"MAIL FROM:<", b"RCPT TO:<", b"EHLO ", b"", b"VRFY "]),
    st.sampled_from([990, 1000, 1001, 1100, 5000, 20000]),
)

HUGE_HEADERS = b"".join(b"X-Fuzz-%d: %s\r\n" % (i, b"v" * 900) for i in range(300)) + b"Subject: huge\r\n\r\nbody\r\n"
FOLDED_HEADER = b"Subject: folded\r\nX-Big: " + (b"a" * 990 + b"\r\n ") * 200 + b"end\r\n\r\nbody\r\n"
BODIES = [
    b"Subject: fuzz\r\n\r\nhello\r\n",
    b"Subject: caf\xe9 \xff\r\nFrom: \xc3\xa9t\xc3\xa9 <x@example.org>\r\n\r\n8-bit \x80\xff body\r\n",
    b"Subject: nul\r\n\r\nNUL \x00 byte\r\n",
    b"Subject: dots\r\n\r\n..leading dot\r\n..\r\n",
    b"Subject: bare\r\n\r\nbare\nLF and bare\rCR\r\n",
    b"Subject: long\r\n\r\n" + b"z" * 1500 + b"\r\n",
    b"Received: from a by b; Thu, 26 Nov 2026 10:00:00 +0000\r\n" * 31 + b"Subject: loop\r\n\r\nloop\r\n",
    b"Subject: no body",
    b"",
    HUGE_HEADERS,
    FOLDED_HEADER,
]
body = st.one_of(st.sampled_from(BODIES), st.binary(max_size=300))
data = st.builds(lambda b, end: b"DATA\r\n" + b + end, body, st.sampled_from([b"\r\n.\r\n", b".\r\n", b""]))
transaction = st.builds(
    lambda sender, rcpts, b: sender + b"".join(rcpts) + b"DATA\r\n" + b + b"\r\n.\r\n",
    mail, st.lists(rcpt, min_size=1, max_size=3), body,
)


def chunked(message: bytes, cuts: list[int], last: bool) -> bytes:
    """``message`` as BDAT chunks, cut at ``cuts``; the last with LAST (or a BDAT 0 LAST after it)."""
    bounds = [0, *sorted({c % (len(message) + 1) for c in cuts}), len(message)]
    *first, final = [message[a:b] for a, b in itertools.pairwise(bounds)]
    out = b"".join(b"BDAT %d\r\n" % len(p) + p for p in first)
    if last:
        return out + b"BDAT %d LAST\r\n" % len(final) + final
    return out + b"BDAT %d\r\n" % len(final) + final + b"BDAT 0 LAST\r\n"


chunks = st.builds(chunked, body, st.lists(st.integers(min_value=0, max_value=400), max_size=3), st.booleans())
bdat_transaction = st.builds(lambda sender, rcpts, c: sender + b"".join(rcpts) + c,
                             mail, st.lists(rcpt, min_size=1, max_size=3), chunks)
BDAT_LINES = [
    b"BDAT 0\r\n", b"BDAT 0 LAST\r\n", b"BDAT 5 last\r\n", b"BDAT\t3\tLAST\r\n", b"BDAT  4  LAST \r\n", b"BDAT\r\n",
    b"BDAT -1\r\n", b"BDAT 1e3\r\n", b"BDAT 10 LAST now\r\n", b"BDAT LAST\r\n", b"BDAT 0x10\r\n", b"bdat 2\n",
    b"BDAT " + b"9" * 21 + b" LAST\r\n", b"BDAT 00000000000000000003 LAST\r\n", b"BDAT \xff\r\n", b"BDAT 7\x00\r\n",
    b"BDAT 99999999 LAST\r\n",  # more than will ever be sent: read (and dropped) until we give up
]
# a BDAT line with what follows: its chunk, or more or fewer octets than it says
bdat_chunk = st.builds(lambda verb, b: verb + b, st.sampled_from(BDAT_LINES),
                       st.one_of(st.sampled_from([b"", b"QUIT\r\n", b"RSET\r\nNOOP\r\n", b"DATA\r\n.\r\n"]),
                                 st.binary(max_size=40)))
bdat_then_data = st.builds(lambda sender, rcpt_, c, b: sender + rcpt_ + b"BDAT %d\r\n" % len(c) + c + b"DATA\r\n" + b
                           + b"\r\n.\r\n", mail, rcpt, body, body)
# The hubs' old logon (exchange-server/<hub> with the organization's server token): no AUTH
# makes a client an Exchange server any more, so it must fail like any wrong password.
TOKEN_LOGON = b"AUTH PLAIN " + b64(b"\0exchange-server/rx-1\0" + b"contoso-demo-token-change-me") + CRLF
AUTH = [
    b"AUTH\r\n", b"AUTH PLAIN a b c\r\n", b"AUTH CRAM-MD5\r\n", b"AUTH XOAUTH2 dGVzdA==\r\n", b"AUTH GSSAPI\r\n",
    b"AUTH plain " + b64(b"\0alice@contoso.com\0x") + CRLF, b"AUTH PLAIN !!!notbase64\r\n", b"AUTH PLAIN ====\r\n",
    b"AUTH PLAIN " + b64(b"no separators") + CRLF, b"AUTH PLAIN " + b64(b"a\0b\0c\0d") + CRLF,
    b"AUTH PLAIN " + b64(b"\0alice@contoso.com\0wrong") + CRLF,
    b"AUTH PLAIN " + b64(b"\0exchange-server/evil\0guess") + CRLF,
    TOKEN_LOGON,  # the old server logon, with the organization's real token: refused like any other
    b"AUTH PLAIN " + b64(b"\0\xff\xfe\0\xff") + CRLF,
    b"AUTH PLAIN " + b64(b"\0alice@contoso.com\0alice-demo-password") + CRLF,  # right, where it is allowed
    b"AUTH PLAIN\r\n*\r\n", b"AUTH PLAIN\r\n%%%\r\n", b"AUTH PLAIN\r\n\r\n",
    b"AUTH PLAIN\r\n" + b64(b"\0bob@contoso.com\0nope") + CRLF,
    b"AUTH LOGIN\r\n*\r\n", b"AUTH LOGIN\r\n" + b64(b"alice@contoso.com") + CRLF + b64(b"wrong") + CRLF,
    b"AUTH LOGIN\r\n" + b64(b"alice@contoso.com") + CRLF + b"*\r\n",
    b"AUTH LOGIN\r\n\xff\xfe\r\n", b"AUTH LOGIN " + b64(b"alice@contoso.com") + CRLF + b"@@@\r\n",
    b"AUTH LOGIN\r\n" + b64(b"alice@contoso.com") + CRLF + b64(b"alice-demo-password") + CRLF,
]
auth = st.one_of(
    st.sampled_from(AUTH),
    st.builds(lambda mech, blob: b"AUTH " + mech + b" " + blob + CRLF, st.sampled_from([b"PLAIN", b"LOGIN", b"X"]),
              st.binary(min_size=1, max_size=60).filter(lambda b: b"\n" not in b)),
)


@dataclass(frozen=True)
class Action:
    """Bytes sent at once (several lines: pipelining), and what to do after ``220`` to STARTTLS."""

    blob: bytes
    tls: str = "abandon"  # "handshake", "garbage" or "abandon" (close the write side)
    garbage: bytes = b""  # sent instead of a ClientHello
    after: bytes = b""  # sent over TLS after the handshake and EHLO


TLS_GARBAGE = [
    b"", b"EHLO client.example\r\nMAIL FROM:<x@example.org>\r\n", b"\x80" * 50,
    b"\x16\x03\x01\x00\x05hello",  # a TLS record header and too little of a ClientHello
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a ClientHello cut short
    b"\x15\x03\x03\x00\x02\x02\x28",  # a TLS alert
]
LOGON = b"AUTH PLAIN " + b64(b"\0alice@contoso.com\0alice-demo-password") + CRLF
AFTER_TLS = [
    b"", b"STARTTLS\r\n", LOGON, TOKEN_LOGON + b"MAIL FROM:<anyone@example.org>\r\n", LOGON + LOGON, b"AUTH PLAIN " + b64(b"\0alice@contoso.com\0wrong") + CRLF,
    LOGON + b"MAIL FROM:<alice@contoso.com>\r\nRCPT TO:<bob@contoso.com>\r\nRCPT TO:<friend@fabrikam.example>\r\n"
    b"DATA\r\nSubject: logged on\r\n\r\nhi\r\n.\r\n",
    LOGON + b"MAIL FROM:<bob@contoso.com>\r\n",  # send as someone else
    LOGON + b"MAIL FROM:<>\r\nRCPT TO:<a.anders@contoso.com>\r\n",
]
handshake = st.builds(lambda after: Action(b"STARTTLS\r\n", tls="handshake", after=after), st.sampled_from(AFTER_TLS))
starttls = st.one_of(
    handshake,
    st.builds(lambda g: Action(b"STARTTLS\r\n", tls="garbage", garbage=g),
              st.one_of(st.sampled_from(TLS_GARBAGE), st.binary(min_size=1, max_size=100))),
    st.just(Action(b"STARTTLS\r\nEHLO client.example\r\n")),  # plaintext pipelined after STARTTLS
)
# More than MAX_UNBROKEN_LINE bytes without CRLF: the server closes the connection.
unbroken = st.builds(lambda prefix, n, sep: prefix + (b"y" * 1000 + sep) * n, st.sampled_from([b"", b"NOOP "]),
                     st.sampled_from([66, 70, 130]), st.sampled_from([b"", b"\n", b"\r"]))
line = st.one_of(simple, mail, rcpt, garbage_line, auth)
pipelined = st.lists(st.one_of(line, data, bdat_chunk), min_size=2, max_size=6).map(b"".join)
action = st.one_of(*(part.map(Action) for part in (
    simple, mail, rcpt, data, transaction, transaction, garbage_line, overlong, auth, pipelined, unbroken,
    bdat_transaction, bdat_transaction, bdat_chunk, bdat_then_data)), starttls)
# (EHLO first?, an opening TLS handshake and logon or none, then anything)
session = st.tuples(st.sampled_from([True, True, True, False]), st.one_of(st.none(), handshake),
                    st.lists(action, min_size=1, max_size=8))

# endregion

# region: the client's model of the server


class Closed(Exception):
    """The connection is over (as the protocol says it must be)."""


def envelope_address(arg: bytes, keyword: str) -> str | None:
    """The address of a MAIL/RCPT argument, parsed as the server (aiosmtpd) parses it."""
    parsed = parse_envelope(arg, keyword)
    return parsed[0] if parsed else None


def smtputf8_requested(arg: bytes) -> bool:
    """Whether MAIL FROM's parameters hold SMTPUTF8 (as aiosmtpd reads them: upper-cased, no value)."""
    parsed = parse_envelope(arg, "FROM:")
    return parsed is not None and "SMTPUTF8" in parsed[1].upper().split()


def parse_envelope(arg: bytes, keyword: str) -> tuple[str, str] | None:
    """(address, parameters) of a MAIL/RCPT argument."""
    text = arg.decode("utf-8", "surrogateescape")
    if text[: len(keyword)].upper() != keyword:
        return None
    text = text[len(keyword):].strip()
    if not text:
        return None
    try:
        addr, rest = (get_angle_addr if text.lstrip().startswith("<") else get_addr_spec)(text)
    except HeaderParseError:
        return None
    return addr.addr_spec, rest


@dataclass
class Model:
    connector: str
    authenticated: bool = False
    sender: str | None = None
    smtputf8: bool = False  # MAIL FROM carried SMTPUTF8
    recipients: list[str] = field(default_factory=list)
    auth_pending: bool = False  # the last reply was 334: the next line answers the challenge
    in_data: bool = False
    chunk: int = 0  # octets of a BDAT chunk still to come (its reply comes after them)
    chunk_line: bytes = b""  # that BDAT command
    chunking: bool = False  # BDAT began this transaction
    pending: bytes = b""  # what was sent after the last complete line
    unbroken: int = 0  # bytes sent since the last CRLF
    accepted: int = 0
    replies: int = 0
    errors: int = 0  # 5xx replies but 535s while not logged on (the connector's max_protocol_errors)
    codes: Counter = field(default_factory=Counter)  # (command, reply code) seen

    def reset(self) -> None:
        self.sender, self.recipients, self.smtputf8, self.chunking = None, [], False, False

    def bdat_size(self, line: bytes) -> int | None:
        """The chunk size of a BDAT command as the server reads it (after the line, it reads
        exactly that many octets), or None if the line is no BDAT with a chunk."""
        text = line.rstrip(b"\r\n")
        verb, _, arg = text.partition(b" ")
        if self.auth_pending or verb.upper() != b"BDAT" or len(text) > 512:
            return None
        parsed = parse_bdat(arg.strip().decode("utf-8", "surrogateescape"))
        return parsed[0] if parsed else None

    def on_chunk(self, reply: Reply, s: RawSession) -> None:
        """The reply to a BDAT command, once its whole chunk was sent."""
        line = self.chunk_line
        last = parse_bdat(line.rstrip(b"\r\n").partition(b" ")[2].strip().decode("utf-8", "surrogateescape"))
        context = f"{self.connector}: {line!r} got {reply}\n{s.dump()}"
        self.codes["BDAT", reply.code] += 1
        if self.sender is None or not self.recipients:
            assert reply.code == 503, f"BDAT outside a transaction: {context}"
            return
        assert last is not None
        if not last[1]:
            if reply.code == 250:
                assert reply.text == f"2.6.0 CHUNK received OK, {last[0]} octets", context
                self.chunking = True
            else:
                self.reset()
            return
        if reply.code == 250:
            assert reply.text.startswith("2.6.0 ") and "Queued" in reply.text, f"250 to BDAT LAST: {context}"
            self.accepted += 1
        self.reset()

    def trips_guard(self, blob: bytes) -> bool:
        run, longest = self.unbroken, 0
        for i, part in enumerate(blob.split(CRLF)):
            run = run + len(part) if i == 0 else len(part)
            longest = max(longest, run)
        self.unbroken = run
        return longest > MAX_UNBROKEN_LINE

    def on_reply(self, line: bytes, reply: Reply, s: RawSession) -> None:
        """Check one reply against what the line may get, and follow the session's state."""
        text = line.rstrip(b"\r\n")
        verb, _, arg = text.partition(b" ")
        verb, arg = verb.upper(), arg.strip()
        context = f"{self.connector}: {line[:200]!r} got {reply}\n{s.dump()}"
        known = verb.decode("ascii", "replace") if verb in VERBS else "other"
        self.codes["AUTH-reply" if self.auth_pending else known, reply.code] += 1
        assert reply.code != 235 or line.startswith(b"AUTH") or self.auth_pending, context
        if self.auth_pending or verb == b"AUTH":
            assert not (line == TOKEN_LOGON and reply.code == 235), f"the server token logged on: {context}"
            self.auth_pending = reply.code == 334
            if reply.code == 235:
                assert self.connector == "Default" and s.sock.__class__.__name__ == "SSLSocket", context
                self.authenticated = True
            return
        if reply.code == 354:
            assert verb == b"DATA", context
            assert not self.chunking, f"DATA in a transaction begun with BDAT: {context}"
            assert self.sender is not None and self.recipients, f"DATA accepted without an envelope: {context}"
            self.in_data = True
        elif reply.code == 250 and verb in (b"EHLO", b"HELO", b"RSET"):
            self.reset()
        elif verb == b"MAIL" and reply.code == 250:
            sender = envelope_address(arg, "FROM:")
            assert sender is not None and self.sender is None, context
            self.smtputf8 = smtputf8_requested(arg)
            assert sender.isascii() or self.smtputf8, f"a UTF-8 sender without SMTPUTF8: {context}"
            if self.connector == "Default":
                assert self.authenticated, f"anonymous MAIL accepted on Default: {context}"
                assert sender == "<>" or canonical(sender) in ALICE, f"sent as someone else: {context}"
            self.sender = sender
        elif verb == b"RCPT" and reply.code == 250:
            recipient = envelope_address(arg, "TO:")
            assert recipient is not None and self.sender is not None, context
            assert recipient.isascii() or self.smtputf8, f"a UTF-8 recipient without SMTPUTF8: {context}"
            if not self.authenticated:
                assert canonical(recipient) in VALID_RECIPIENTS, f"relay or unknown recipient accepted: {context}"
            self.recipients.append(recipient)
        elif reply.code == 250 and verb in (b"MAIL", b"RCPT", b"DATA", b"BDAT"):
            raise AssertionError(f"unexpected 250: {context}")

    def on_data_end(self, reply: Reply, s: RawSession) -> None:
        self.codes["end of DATA", reply.code] += 1
        if reply.code == 250:
            assert self.sender is not None and self.recipients, f"message taken without an envelope\n{s.dump()}"
            assert reply.text.startswith("2.6.0 "), f"250 after DATA is not 'queued': {reply}\n{s.dump()}"
            self.accepted += 1
        self.reset()


CLOSING = (221, 421)
MAX_PROTOCOL_ERRORS = 10  # the demo's connectors: the default
VERBS = {b"EHLO", b"HELO", b"MAIL", b"RCPT", b"DATA", b"BDAT", b"RSET", b"NOOP", b"QUIT", b"VRFY", b"HELP", b"AUTH",
         b"STARTTLS"}
BIG_CHUNK = 100_000  # a chunk still owed beyond this at the end: the session ends without it


def read(s: RawSession, model: Model) -> Reply:
    try:
        reply = s.reply()
    except ServerClosed as exc:
        raise AssertionError(f"the server closed the connection unexpectedly ({exc})\n{s.dump()}") from None
    model.replies += 1
    if reply.code in CLOSING or (reply.code == 502 and "goodbye" in reply.text):
        s.expect_closed()
        raise Closed
    if not model.authenticated and reply.code >= 500 and reply.code != 535:
        model.errors += 1
        if model.errors >= MAX_PROTOCOL_ERRORS:  # answered, then 421 4.7.0 and closed
            final = s.reply()
            assert (final.code, final.text) == (421, "4.7.0 Too many errors on this connection, closing "
                                                     "transmission channel"), f"{final}\n{s.dump()}"
            s.expect_closed()
            raise Closed
    return reply


def play(s: RawSession, model: Model, blob: bytes) -> bool:
    """Send ``blob`` and read every reply the server owes for it. True if STARTTLS got 220."""
    if model.trips_guard(blob):
        s.send(blob)
        s.expect_closed()
        raise Closed
    # A send that fails is fine only if the replies before it end the session (the fifth unknown
    # command of a long blob closes the connection while the rest is still on its way).
    sent = s.send(blob)
    stream, pos = model.pending + blob, 0
    while True:
        if model.chunk:  # a chunk: exactly its size, whatever it holds
            take = min(model.chunk, len(stream) - pos)
            pos, model.chunk = pos + take, model.chunk - take
            if model.chunk:
                break
            model.on_chunk(read(s, model), s)
            continue
        if model.in_data:  # DATA lines end with CRLF; a line of one dot ends the message
            end = stream.find(CRLF, pos)
            if end < 0:
                break
            line, pos = stream[pos:end + 2], end + 2
            if line == b".\r\n":
                model.in_data = False
                model.on_data_end(read(s, model), s)
            continue
        end = stream.find(b"\n", pos)  # command lines end with LF (aiosmtpd reads up to LF)
        if end < 0:
            break
        line, pos = stream[pos:end + 1], end + 1
        if (size := model.bdat_size(line)) is not None:
            model.chunk, model.chunk_line = size, line
            if size:
                continue
            model.on_chunk(read(s, model), s)
            continue
        if model.auth_pending and len(line) > 1000:
            # aiosmtpd's AUTH exchange reads with readline(), which answers an overlong line
            # in two parts; the model cannot follow, so the session ends here
            s.half_close()
            s.expect_closed()
            raise Closed
        reply = read(s, model)
        model.on_reply(line, reply, s)
        if line.rstrip(b"\r\n").upper() == b"STARTTLS" and reply.code == 220:
            model.pending = b""  # the server discards plaintext sent after STARTTLS
            return True
    if not sent:
        s.expect_closed()
        raise AssertionError(f"the server closed the connection while we were sending\n{s.dump()}")
    model.pending = stream[pos:]
    return False


def run_session(address: tuple[str, int], source: str, connector: str, ehlo: bool,
                actions: list[Action]) -> Model:
    model = Model(connector)
    s = RawSession.open(address, source, timeout=10)
    try:
        greeting = s.reply()
        assert greeting.code == 220, greeting
        if ehlo:
            play(s, model, b"EHLO client.example\r\n")
        for act in actions:
            if not play(s, model, act.blob):
                continue
            model.reset()
            model.auth_pending = model.in_data = False
            model.chunk = 0
            if act.tls == "handshake":
                s.starttls()
                model.unbroken = 0
                play(s, model, b"EHLO client.example\r\n")
                if act.after and play(s, model, act.after):
                    s.half_close()  # STARTTLS inside TLS is refused; if it were not, give up here
                    s.expect_closed()
                    raise Closed
                continue
            if act.tls == "garbage":  # garbage instead of a ClientHello
                s.send(act.garbage)
            s.half_close()  # the server must give up on the handshake and close, not wait
            s.expect_closed()
            raise Closed
        if model.chunk > BIG_CHUNK:  # the server must give up on the chunk when we stop sending
            s.half_close()
            s.expect_closed()
            raise Closed
        if model.chunk:
            play(s, model, (b"z" * 98 + CRLF) * (model.chunk // 100) + b"z" * (model.chunk % 100))
        for _ in range(3):  # end the session politely; QUIT may first answer an AUTH challenge
            if model.in_data or model.pending:
                play(s, model, b"\r\n.\r\n")
            play(s, model, b"QUIT\r\n")
        raise AssertionError(f"QUIT did not end the session\n{s.dump()}")
    except Closed:
        return model
    finally:
        s.close()


# endregion


@pytest.fixture(scope="module")
def site(redis_server, tmp_path_factory):
    with running_site(redis_server, tmp_path_factory.mktemp("fuzz"), ORG, mailboxes=["MBX-AMS-01"]) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def rx_pid(site: Cluster) -> int:
    """The receive process as it was before the first fuzzed session."""
    return receive_pid(site)


@pytest.mark.parametrize(("connector", "source"), [("Default", "127.0.0.1"), ("Internet", INTERNET_SOURCE)])
def test_fuzzed_sessions_get_well_formed_replies_and_no_refused_envelope_gets_through(
        site: Cluster, rx_pid: int, connector: str, source: str) -> None:
    address = site.smtp("rx-1", connector)
    stats = {"sessions": 0, "replies": 0, "accepted": 0}
    codes: Counter = Counter()
    started = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(session)
    def fuzz(drawn: tuple[bool, Action | None, list[Action]]) -> None:
        ehlo, opening, actions = drawn
        model = run_session(address, source, connector, ehlo, [opening, *actions] if opening else actions)
        stats["sessions"] += 1
        stats["replies"] += model.replies
        stats["accepted"] += model.accepted
        codes.update(model.codes)

    try:
        fuzz()
    finally:
        print(f"\n{connector}: {stats['sessions']} sessions, {stats['replies']} replies, {stats['accepted']} "
              f"messages accepted in {time.monotonic() - started:.1f}s; receive RSS {rss_kb(rx_pid)} kB")
        print("  replies by command: " + ", ".join(f"{verb} {code}: {n}" for (verb, code), n in sorted(codes.items())))

    # What the tracking log says was taken in: only mail for existing recipients of the
    # accepted domain from anonymous clients, and only alice's own mail from her logon.
    for record in tracking.search(site.r, event="RECEIVE"):
        if record.connector == "rx-1\\Internet":
            assert set(record.recipients) <= VALID_RECIPIENTS, record
        else:
            assert record.connector == "rx-1\\Default", record
            assert record.sender in ALICE | {""}, record
    assert alive(rx_pid), "the receive process died"


def test_the_receive_process_survived_and_still_takes_mail(site: Cluster, rx_pid: int) -> None:
    assert receive_pid(site) == rx_pid and alive(rx_pid), "the receive process was restarted"
    subject = f"after the fuzz {uuid.uuid4().hex[:8]}"
    with smtplib.SMTP(*site.smtp("rx-1", "Internet"), local_hostname="client.example", timeout=15,
                      source_address=(INTERNET_SOURCE, 0)) as client:
        client.sendmail("sender@fabrikam.example", ["bob@contoso.com"],
                        f"From: sender@fabrikam.example\r\nSubject: {subject}\r\n\r\nstill here\r\n")
    with smtplib.SMTP(*site.smtp("rx-1", "Default"), local_hostname="client.example", timeout=15) as client:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        client.starttls(context=ctx)
        client.login("alice@contoso.com", "alice-demo-password")
        client.sendmail("alice@contoso.com", ["bob@contoso.com"],
                        f"From: alice@contoso.com\r\nSubject: {subject} (logged on)\r\n\r\nstill here\r\n")
    site.wait_for_subject("bob@contoso.com", subject)
    site.wait_for_subject("bob@contoso.com", f"{subject} (logged on)")
    errors = receive_errors(site.procs["rx-1"].log.read_text(errors="replace"))
    assert not errors, "the receive process logged errors:\n" + "\n".join(errors[:20])
