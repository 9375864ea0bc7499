"""mailbox/compose.py: the plain message a Send describes, written as the email package writes it.

Wherever ``plain_message`` writes a message, its bytes are exactly the email package's (an
EmailMessage with the same fields and ``set_content``, flattened with the SMTP policy), so a
client cannot tell which of the two built its mail. Where it declines (None), the API builds
the message with the email package.
"""

from __future__ import annotations

import json
from email.message import EmailMessage
from email.policy import SMTP

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mailyard.mailbox.api import ApiError, compose, compose_from_json
from mailyard.mailbox.compose import plain_message


def by_the_email_package(sender: str, recipients: dict[str, list[str]], subject: str,
                         message_id: str | None, text: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    for name, addresses in recipients.items():
        if addresses:
            msg[name] = ", ".join(addresses)
    msg["Subject"] = subject
    if message_id is not None:
        msg["Message-ID"] = message_id
    msg.set_content(text)
    return msg.as_bytes(policy=SMTP)


atoms = st.text(alphabet="abcXYZ09!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=8) \
    | st.sampled_from(["=?us-ascii?q?x?=", "=?utf-8?b?eA==?=", "=?", "?="])  # encoded words: declined
dot_atoms = st.lists(atoms, min_size=1, max_size=3).map(".".join)
addresses = st.builds(lambda local, domain: f"{local}@{domain}", dot_atoms, dot_atoms)
# Addresses and ids also drawn from what is not a plain addr-spec, so that declining is tested too
any_address = st.one_of(addresses, st.text(alphabet='ab@." <>,\\()é', min_size=1, max_size=12))
subjects = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=80) \
    | st.text(max_size=20)
message_ids = st.none() | addresses.map(lambda a: f"<{a}>") | st.text(max_size=12).map(lambda t: f"<{t}>")
body_lines = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=90) \
    | st.text(alphabet="ab =.\t", min_size=70, max_size=300)
bodies = st.lists(body_lines, max_size=8).flatmap(
    lambda lines: st.sampled_from(["\n", "\r\n", "\r"]).map(lambda end: end.join(lines))) | st.text(max_size=30)


@settings(max_examples=600, deadline=None)
@given(sender=any_address, to=st.lists(any_address, max_size=3), cc=st.lists(addresses, max_size=2),
       bcc=st.lists(addresses, max_size=2), subject=subjects, message_id=message_ids, text=bodies)
@example(sender="alice@contoso.com", to=["carol@contoso.com"], cc=[], bcc=[], subject="",
         message_id=None, text="")
@example(sender="alice@contoso.com", to=["carol@contoso.com"], cc=[], bcc=[], subject="Hi =?x",
         message_id=None, text="From me\n.\n")
def test_a_message_it_writes_is_byte_for_byte_the_email_package_s(
        sender: str, to: list[str], cc: list[str], bcc: list[str], subject: str,
        message_id: str | None, text: str) -> None:
    recipients = {"To": to, "Cc": cc, "Bcc": bcc}
    written = plain_message(sender, recipients, subject, message_id, text)
    if written is None:
        return
    try:
        expected = by_the_email_package(sender, recipients, subject, message_id, text)
    except Exception as exc:  # the package refuses what the fast writer accepted: a defect
        raise AssertionError(f"plain_message wrote a message the email package refuses ({exc}):\n"
                             f"{written!r}") from None
    assert written == expected, f"the two writers differ:\n{written!r}\n{expected!r}"


def test_the_usual_send_takes_the_short_way() -> None:
    text = ("lorem ipsum dolor sit amet " * 2 + "\n") * 90
    written = plain_message("alice@contoso.com", {"To": ["carol@contoso.com", "bob@contoso.com"],
                                                  "Cc": [], "Bcc": ["dave@contoso.com"]},
                            "Quarterly figures", "<1.2@contoso.com>", text)
    assert written is not None, "a plain ASCII message went the long way"
    assert written.startswith(b"From: alice@contoso.com\r\nTo: carol@contoso.com, bob@contoso.com\r\n"
                              b"Bcc: dave@contoso.com\r\nSubject: Quarterly figures\r\n")


def test_what_needs_encoding_or_folding_goes_the_long_way() -> None:
    plain = {"To": ["carol@contoso.com"]}
    assert plain_message("alice@contoso.com", {"To": ["Carol <carol@contoso.com>"]}, "s", None, "") is None
    assert plain_message("alice@contoso.com", plain, "Grüße", None, "") is None
    assert plain_message("alice@contoso.com", plain, "s", None, "Grüße\n") is None
    assert plain_message("alice@contoso.com", plain, "x" * 80, None, "") is None
    assert plain_message("alice@contoso.com", plain, "s", None, "\x01" * 79 + "\n") is None  # base64
    assert plain_message("alice@contoso.com", plain, "s", None, "ok\r\n") is not None


def test_an_address_that_holds_an_encoded_word_is_refused_not_decoded_into_others() -> None:
    """The email package decodes =?...?= in an address (one JSON recipient could become three)."""
    assert plain_message("alice@contoso.com", {"To": ["=?us-ascii?q?evil?=@contoso.com"]}, "s", None, "") is None
    for to in ("=?us-ascii?q?evil?=@contoso.com", "Carol <=?us-ascii?q?x=3E=2C_y=40evil.com=2C_z?=@contoso.com>"):
        with pytest.raises(ApiError) as refused:
            compose({"to": [to], "subject": "s", "body": ""}, "alice@contoso.com")
        assert refused.value.status == 400 and "encoded word" in refused.value.message


def test_a_long_line_is_quoted_printable_as_the_email_package_makes_it() -> None:
    text = "A paragraph typed without line breaks, as web mail clients send them. " * 20 + "\n"
    written = plain_message("alice@contoso.com", {"To": ["carol@contoso.com"]}, "s", None, text)
    assert written is not None, "a long ASCII line went the long way"
    assert b"Content-Transfer-Encoding: quoted-printable\r\n" in written
    assert written == by_the_email_package("alice@contoso.com", {"To": ["carol@contoso.com"]}, "s", None, text)


def test_the_api_writes_the_same_message_either_way() -> None:
    """A JSON Send with a display name (the long way) and without (the short way) differ only there."""
    def send(to: str) -> bytes:
        return compose_from_json(json.dumps({"to": [to], "subject": "Hello", "body": "Hi\n",
                                             "message_id": "<m@contoso.com>"}).encode(),
                                 "alice@contoso.com")
    assert send("Carol <carol@contoso.com>") == send("carol@contoso.com").replace(
        b"To: carol@contoso.com", b"To: Carol <carol@contoso.com>")
