"""Passwords are never stored in plain text (issue 11, item 3): scrypt hashes, the organization
file holding a password or a hash, `org apply` storing only hashes in Redis,
`mailyard org hash-password`, and `org show` masking every secret. Logons against the stored
hash over real SMTP are in tests/hub/test_receive_handler.py."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis

from mailyard import keys, passwords, redisconn
from mailyard.errors import ConfigError
from mailyard.org import parse_org
from mailyard.orgstore import apply_org, hash_passwords, read_org
from tests.conftest import CONTOSO, ROOT, make_org

DEMO_SECRETS = ("-demo-password", "contoso-demo-token-change-me", "relay-secret")


def mailyard(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "mailyard", *args], input=stdin, capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, cwd=ROOT, timeout=120)
    if check:
        assert result.returncode == 0, f"mailyard {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


# region: hashing


def test_a_hash_verifies_its_password_and_no_other() -> None:
    encoded = passwords.hash_password("correct horse battery staple")
    scheme, n, r, p, salt, key = encoded.split("$")
    assert (scheme, n, r, p) == ("scrypt", str(2**14), "8", "1")
    assert "correct horse" not in encoded and passwords.is_hash(encoded)
    passwords.forget()  # no help from the cache of successful verifications
    assert passwords.verify("correct horse battery staple", encoded)
    assert passwords.verify(b"correct horse battery staple", encoded), "SMTP AUTH gives bytes"
    for wrong in ("correct horse battery stapl", "Correct horse battery staple", "", encoded):
        assert not passwords.verify(wrong, encoded)
    assert passwords.verify("correct horse battery staple", encoded), "and again, from the cache"


def test_every_hash_has_its_own_salt() -> None:
    one, two = passwords.hash_password("same"), passwords.hash_password("same")
    assert one != two and one.split("$")[4] != two.split("$")[4]
    assert passwords.verify("same", one) and passwords.verify("same", two)


def test_a_value_that_is_no_valid_hash_verifies_nothing() -> None:
    encoded = passwords.hash_password("pw")
    assert not passwords.verify("pw", "pw"), "a password kept in clear is not a hash"
    head, key = encoded.rsplit("$", 1)
    assert not passwords.verify("pw", f"{head}${'B' if key[0] == 'A' else 'A'}{key[1:]}"), "another key"
    assert not passwords.verify("pw", encoded[:-10]), "cut short: not base64"
    assert not passwords.verify("pw", encoded.replace("$16384$", "$16383$"))


def test_one_verification_costs_milliseconds_not_seconds() -> None:
    encoded = passwords.hash_password("timed")
    passwords.forget()
    start = time.perf_counter()
    assert passwords.verify("timed", encoded)
    first = time.perf_counter() - start
    start = time.perf_counter()
    assert passwords.verify("timed", encoded)
    again = time.perf_counter() - start
    assert first < 1.0, f"one scrypt took {first:.3f} s"
    assert again < 0.005, f"a repeated logon should hit the cache, took {again * 1000:.1f} ms"


# endregion

# region: the organization file


MINIMAL = """
name = "T"
accepted_domains = ["t.example"]
[[sites]]
name = "S"
mailbox_servers = ["M1"]
[[mailboxes]]
address = "a@t.example"
server = "M1"
password = {password}
"""


def org_with(password: str):
    return parse_org(textwrap.dedent(MINIMAL.format(password=json.dumps(password))), source="org.toml")


def test_the_file_may_hold_a_password_or_a_hash_in_the_same_key() -> None:
    assert org_with("in-clear").mailboxes[0].password == "in-clear"
    encoded = passwords.hash_password("hashed")
    assert org_with(encoded).mailboxes[0].password == encoded


@pytest.mark.parametrize("bad", [
    "scrypt$16384$8$1$c2FsdA==",                                         # a part missing
    "scrypt$16384$8$1$!!!!$" + "A" * 44,                                 # salt not base64
    "scrypt$10000$8$1$" + "A" * 24 + "$" + "A" * 44,                      # n not a power of two
    "scrypt$1048576$8$1$" + "A" * 24 + "$" + "A" * 44,                    # 1 GiB of memory asked
    "scrypt$x$8$1$" + "A" * 24 + "$" + "A" * 44,
    "scrypt$16384$8$1$" + "A" * 24 + "$QUFB",                             # a 3-byte key
    "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW",      # bcrypt
    "$argon2id$v=19$m=65536,t=3,p=4$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG",
])
def test_a_malformed_hash_is_refused_naming_the_key(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        org_with(bad)
    text = str(info.value)
    assert "mailboxes[0].password" in text and "line 10" in text, text
    assert "hash" in text and bad not in text, "the error names the key, not the value"


# endregion

# region: what `org apply` stores


def every_value(r: redis.Redis) -> list[bytes]:
    """Every value of every key of this database, whatever its type."""
    out: list[bytes] = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "string":
            out.append(r.get(key))
        elif kind == "hash":
            out += [x for kv in r.hgetall(key).items() for x in kv]
        elif kind == "list":
            out += r.lrange(key, 0, -1)
        elif kind == "set":
            out += list(r.smembers(key))
        elif kind == "zset":
            out += [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            out += [x for _, fields in r.xrange(key) for kv in fields.items() for x in kv]
        out.append(key)
    return [v if isinstance(v, bytes) else str(v).encode() for v in out]


def test_apply_stores_only_hashes_and_applying_again_keeps_them(redis_url: str) -> None:
    r = redisconn.connect(redis_url)
    org = make_org()
    assert any(m.password.endswith("-demo-password") for m in org.mailboxes)
    apply_org(r, org)
    stored = r.get(keys.ORG)
    assert stored and b"-demo-password" not in stored
    leaks = [v for v in every_value(r) if b"-demo-password" in v]
    assert not leaks, f"a password in clear in Redis: {leaks[:1]}"
    _, applied = read_org(r)
    hashes = {m.address: m.password for m in applied.mailboxes}
    assert all(passwords.is_hash(h) for h in hashes.values() if h)
    assert passwords.verify("alice-demo-password", hashes["alice@contoso.com"])
    assert not passwords.verify("bob-demo-password", hashes["alice@contoso.com"])
    # The same file again: the same hashes (hubs verify against them, and remember them).
    apply_org(r, make_org())
    _, again = read_org(r)
    assert {m.address: m.password for m in again.mailboxes} == hashes
    # A changed password gets a new hash; a hash in the file is stored as it is.
    new = passwords.hash_password("dave-new-password")
    changed = make_org().model_dump(mode="json")
    for mb in changed["mailboxes"]:
        if mb["address"] == "alice@contoso.com":
            mb["password"] = "alice-new-password"
        if mb["address"] == "dave@contoso.com":
            mb["password"] = new
    apply_org(r, type(org).model_validate(changed))
    _, third = read_org(r)
    after = {m.address: m.password for m in third.mailboxes}
    assert after["alice@contoso.com"] != hashes["alice@contoso.com"] and after["dave@contoso.com"] == new
    assert passwords.verify("alice-new-password", after["alice@contoso.com"])
    assert after["bob@contoso.com"] == hashes["bob@contoso.com"]


def test_hash_passwords_leaves_hashes_and_empty_passwords_alone() -> None:
    org = hash_passwords(make_org())
    assert hash_passwords(org) == org
    assert all(not m.password or passwords.is_hash(m.password) for m in org.mailboxes)


# endregion

# region: the command line


def test_hash_password_from_stdin_prints_a_hash_that_verifies() -> None:
    result = mailyard("org", "hash-password", "--stdin", stdin="s3cret pass phrase\n")
    encoded = result.stdout.strip()
    assert passwords.is_hash(encoded) and passwords.verify("s3cret pass phrase", encoded)
    assert "s3cret" not in result.stdout + result.stderr
    # the hash goes straight into an organization file
    assert org_with(encoded).mailboxes[0].password == encoded


@pytest.mark.parametrize(("args", "stdin", "message"), [
    (["--stdin"], "", "empty"),
    (["--stdin"], "one\ntwo\n", "more than one line"),
    ([], "piped\n", "pass --stdin"),
])
def test_hash_password_refuses_what_it_cannot_take(args: list[str], stdin: str, message: str) -> None:
    result = mailyard("org", "hash-password", *args, stdin=stdin, check=False)
    assert result.returncode == 1 and message in result.stderr and not result.stdout


def test_hash_password_never_takes_the_password_as_an_argument() -> None:
    result = mailyard("org", "hash-password", "s3cret", stdin="", check=False)
    assert result.returncode == 2 and "s3cret" not in result.stdout
    assert "--password" not in mailyard("org", "hash-password", "--help").stdout


def read_until(fd: int, text: bytes, timeout: float = 30) -> bytes:
    seen = b""
    end = time.monotonic() + timeout
    while text not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if not ready:
            raise AssertionError(f"waited for {text!r}, got {seen!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    return seen


def test_hash_password_on_a_terminal_asks_twice_without_echo() -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "mailyard", "org", "hash-password"], cwd=ROOT,
                            stdin=slave, stdout=subprocess.PIPE, stderr=slave, start_new_session=True)
    os.close(slave)
    try:
        seen = read_until(master, b"Password: ")
        os.write(master, b"typed-secret\n")
        seen += read_until(master, b"Repeat the password: ")
        os.write(master, b"typed-other\n")  # not the same: asked again
        seen += read_until(master, b"Password: ")
        os.write(master, b"typed-secret\n")
        seen += read_until(master, b"Repeat the password: ")
        os.write(master, b"typed-secret\n")
        out, _ = proc.communicate(timeout=60)
        seen += read_until(master, b"\n", timeout=1) if proc.returncode else b""
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, seen
    assert b"do not match" in seen and b"typed-" not in seen, f"the terminal echoed the password: {seen!r}"
    encoded = out.decode().strip()
    assert passwords.verify("typed-secret", encoded) and not passwords.verify("typed-other", encoded)


def test_org_show_masks_every_password_hash_and_token(redis_url: str, tmp_path: Path) -> None:
    hashed = passwords.hash_password("dave-hashed-password")
    text = CONTOSO.read_text().replace('password = "dave-demo-password"', f'password = "{hashed}"')
    assert hashed in text
    # and a send connector through a smart host that logs on
    text += textwrap.dedent("""
        [[send_connectors]]
        name = "Via relay"
        address_spaces = ["SMTP:relay.example;5"]
        dns_routing = false
        smart_hosts = ["relay.example"]
        smart_host_username = "contoso"
        smart_host_password = "relay-secret"
        """)
    org_file = tmp_path / "org.toml"
    org_file.write_text(text)
    env = {"MAILYARD_REDIS_URL": redis_url}
    mailyard("org", "apply", str(org_file), env=env)
    _, applied = read_org(redisconn.connect(redis_url))
    stored_hashes = [m.password for m in applied.mailboxes if m.password]

    as_json = mailyard("org", "show", "--json", env=env).stdout
    plain = mailyard("org", "show", env=env).stdout
    for shown in (as_json, plain):
        for secret in (*DEMO_SECRETS, "scrypt$", hashed, *stored_hashes):
            assert secret not in shown, f"org show printed a secret: {secret[:12]}..."
    data = json.loads(as_json)
    assert {m["password"] for m in data["mailboxes"]} == {"********"}
    assert "server_token" not in data["transport"], "the old server token is no longer stored"
    relay = next(c for c in data["send_connectors"] if c["name"] == "Via relay")
    assert relay["smart_host_password"] == "********" and relay["smart_host_username"] == "contoso"
    assert next(c for c in data["send_connectors"] if c["name"] != "Via relay")["smart_host_password"] == ""


# endregion
