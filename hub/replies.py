"""SMTP replies of the receive connectors: Exchange 2010's texts with enhanced status codes
(RFC 3463), and the rewriting of aiosmtpd's own replies, which mostly have none."""

from __future__ import annotations

import re

# region: Mailyard's replies (reference/exchange-2010-transport.md §3.6)

SENDER_OK = "250 2.1.0 Sender OK"
RECIPIENT_OK = "250 2.1.5 Recipient OK"
NOT_AUTHENTICATED = "530 5.7.1 Client was not authenticated"
UNABLE_TO_RELAY = "550 5.7.1 Unable to relay"
NEED_MAIL = "503 5.5.1 Need MAIL command"  # DATA before MAIL FROM
SEND_AS_DENIED = "550 5.7.1 Client does not have permissions to send as this sender"
USER_UNKNOWN = "550 5.1.1 User unknown"
INVALID_RECIPIENT = "501 5.1.3 Invalid address"
INVALID_SENDER = "501 5.1.7 Invalid address"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
NEED_SMTPUTF8 = "553 5.6.7 Must declare SMTPUTF8 to send unicode address"  # RFC 6531 3.4 (Postfix's text)
HOP_COUNT = "554 5.4.6 Hop count exceeded - possible mail loop"
NO_RESOURCES = "452 4.3.1 Insufficient system resources"
STORAGE_FAILED = "451 4.3.0 Temporary storage failure; try again later"
NO_CONNECTOR = "421 4.3.2 Service not available, closing transmission channel"
TOO_MANY_CONNECTIONS = (
    "421 4.3.2 The maximum number of concurrent connections has exceeded a limit, "
    "closing transmission channel"
)
STARTTLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first"
TLS_ACTIVE = "554 5.5.1 Error: TLS already active"
TOO_MANY_ERRORS = "421 4.7.0 Too many errors on this connection, closing transmission channel"
SOURCE_ERRORS = "421 4.7.0 Too many errors from your address; try again later"  # protocol_errors_per_source
LOGON_LOCKED = "454 4.7.0 Too many failed logons; try again later"  # right password or not
LOGON_UNAVAILABLE = "454 4.7.0 Temporary authentication failure"  # RFC 4954: the lockout state unreadable
AUTH_REQUIRED = "550 5.7.1 RESOLVER.RST.AuthRequired; authentication required"  # a group's, for anonymous senders
INACTIVITY_TIMEOUT = "451 4.7.0 Timeout waiting for client input"  # ConnectionInactivityTimeout
CONNECTION_TIMEOUT = "421 4.4.2 Connection timed out, closing transmission channel"  # ConnectionTimeout
BDAT_SYNTAX = "501 5.5.4 Syntax: BDAT chunk-size [LAST]"
DATA_AFTER_BDAT = "503 5.5.1 Bad sequence of commands"  # RFC 3030 §2: no DATA in a transaction begun with BDAT


def not_replicated(reason: str) -> str:
    """Stored on one Redis only (transport ``durability`` ``replica``): not yet safe to accept."""
    return f"451 4.3.0 Temporary storage failure: {reason}; try again later"


def header_refused(problem: object) -> str:
    """DATA: a message that cannot be taken in as it is (``mailyard.mime.Unfit``)."""
    return f"554 5.6.0 Message refused: {problem}"


def chunk_received(size: int) -> str:
    return f"250 2.6.0 CHUNK received OK, {size} octets"


def queued(message_id: str, internal_id: str, hub: str) -> str:
    return f"250 2.6.0 {message_id} [InternalId={internal_id}, Hostname={hub}] Queued mail for delivery"


# endregion

# region: rewriting aiosmtpd's replies

_REWRITES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^250 OK$"), "250 2.0.0 OK"),
    (re.compile(r"^221 Bye$"), "221 2.0.0 Service closing transmission channel"),
    (re.compile(r"^354 End data with .*"), "354 Start mail input; end with <CRLF>.<CRLF>"),
    (re.compile(r"^220 Ready to start TLS$"), "220 2.0.0 SMTP server ready"),
    (re.compile(r"^454 TLS not available$"), "454 4.7.0 TLS not available"),
    (re.compile(r"^552 Error: (message size exceeds|Too much mail data).*"), TOO_BIG),
    (re.compile(r"^503 Error: send (HELO|EHLO) first$"), "503 5.5.2 Send hello first"),
    (re.compile(r"^503 Error: need MAIL command$"), "503 5.5.2 Need mail command"),
    (re.compile(r"^503 Error: need RCPT command$"), "503 5.5.2 Need rcpt command"),
    (re.compile(r"^503 Error: nested MAIL command$"), "503 5.5.2 Sender already specified"),
    (re.compile(r"^503 Already authenticated$"), "503 5.5.2 Already authenticated"),
    (re.compile(r"^530 Must issue a STARTTLS command first$"), STARTTLS_FIRST),
    (re.compile(r"^535 5\.7\.8 .*"), "535 5.7.3 Authentication unsuccessful"),
    (re.compile(r"^553 5\.1\.3 .*"), "501 5.1.3 Invalid address"),
    (re.compile(r"^500 Error: command [\"']?(.*?)[\"']? not recognized$"), r"500 5.3.3 Unrecognized command '\1'"),
    (re.compile(r"^500 Error: bad syntax$"), "500 5.5.2 Syntax error, command unrecognized"),
    (re.compile(r"^500 Command line too long$"), "500 5.5.2 Line too long"),
    (re.compile(r"^500 Line too long.*"), "500 5.5.2 Line too long"),
    (re.compile(r"^500 Error: strict ASCII mode$"), "500 5.6.7 Non-ASCII data needs SMTPUTF8 or 8BITMIME"),
    (re.compile(r"^500 Error: \((\w+)\) .*"), r"451 4.3.0 Local error in processing (\1)"),
    (re.compile(r"^501 Syntax: (.*)"), r"501 5.5.4 Syntax: \1"),
    (re.compile(r"^501 Error: (.*)"), r"501 5.5.4 \1"),
    (re.compile(r"^501 (Not enough value|Too many values)$"), r"501 5.5.4 \1"),
    (re.compile(r"^501 Supported commands: (.*)"), r"501 5.5.4 Unknown command; supported commands: \1"),
    (re.compile(r"^502 (?!\d\.\d)(.*)"), r"502 5.5.1 \1"),
    (re.compile(r"^555 (?!\d\.\d)(.*)"), r"555 5.5.4 \1"),
    (re.compile(r"^421 Too many connections$"), TOO_MANY_CONNECTIONS),
    # 2xx replies carry an enhanced code too (RFC 2034: every reply once ENHANCEDSTATUSCODES
    # is offered), and HELP answers 214 (RFC 5321 4.2.3), not aiosmtpd's 250
    (re.compile(r"^252 (?!\d\.\d)(.*)"), r"252 2.0.0 \1"),
    (re.compile(r"^250 (Supported commands|Syntax): (.*)"), r"214 2.0.0 \1: \2"),
]


_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


_memo: dict[str, str] = {}


def enhance(reply: str) -> str:
    """``_enhance``, remembered: the same few replies come back on every session."""
    found = _memo.get(reply)
    if found is None:
        found = _enhance(reply)
        if len(_memo) < 1024:
            _memo[reply] = found
    return found


def _enhance(reply: str) -> str:
    """Give an aiosmtpd reply Exchange's wording and an enhanced status code.

    Some replies echo what the client sent (an unknown command, a VRFY argument, a
    Message-ID); anything but printable ASCII in them becomes ``?``, so a reply is always one
    well-formed line (no NUL, CR, LF or undecodable bytes from a hostile client)."""
    reply = _UNPRINTABLE.sub("?", reply)
    for pattern, replacement in _REWRITES:
        if pattern.match(reply):
            return pattern.sub(replacement, reply)
    return reply


# endregion
