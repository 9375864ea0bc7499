"""Redis only for Mailyard (issue 11, item 7): the Redis of `mailyard site up` and the tests'
Redis run with a password that is on no command line; site.json has Redis's URL without it and
the CLI takes it from the site's secrets.toml (0600), so whoever cannot read that file cannot
act on the site; the Redis data directory is 0700 and its AOF 0600; URLs are shown masked.
Real redis-server processes throughout."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from mailyard import redisconn
from mailyard.site import redis_server
from mailyard.site import secrets as site_secrets
from mailyard.site.runner import Site, SiteConfig
from mailyard.testing.redis_server import RedisServer
from tests.conftest import ROOT, make_org


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def mailyard(*args: str, cwd: Path = ROOT, user_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILYARD_")}
    env.update(user_env or {})
    return subprocess.run([sys.executable, "-m", "mailyard", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def refused_anonymously(port: int) -> None:
    anonymous = redisconn.connect(f"redis://127.0.0.1:{port}/0")
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with pytest.raises(redis.AuthenticationError):
        anonymous.get("anything")
    wrong = redisconn.connect(f"redis://:not-the-password@127.0.0.1:{port}/0")
    with pytest.raises(redis.AuthenticationError):
        wrong.ping()


def assert_private_redis_dir(data_dir: Path) -> None:
    assert mode(data_dir) == 0o700
    aof_files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert any("aof" in p.name for p in aof_files), sorted(p.name for p in aof_files)
    for path in data_dir.rglob("*"):
        assert mode(path) == (0o700 if path.is_dir() else 0o600), f"{path}: {mode(path):04o}"


# region: the Redis of `mailyard site up`


class RedisOfASite:
    """What `site up` does for its Redis (secrets, plan, start), without the rest of the site."""

    def __init__(self, data_dir: Path) -> None:
        self.site = Site(SiteConfig(org=make_org(), config_path=ROOT / "deploy" / "contoso.toml",
                                    data_dir=data_dir, hubs_per_site=1, internet=False))
        self.secrets = self.site.load_secrets()
        self.site.plan()
        assert self.site.redis is not None
        self.redis = self.site.redis
        self.redis.start(self.site.env())
        redis_server.wait_ready(self.site.redis_url, self.redis.proc)
        self.site.write_state()

    @property
    def port(self) -> int:
        return int(self.site.redis_url.rsplit(":", 1)[1].split("/")[0])

    def stop(self) -> None:
        if self.redis.proc and self.redis.proc.poll() is None:
            self.redis.proc.terminate()
            self.redis.proc.wait(timeout=10)


@pytest.fixture
def site_redis() -> Iterator[RedisOfASite]:
    # In a directory other users may enter (as a site's may be), unlike pytest's tmp_path:
    # the secrets in it must be safe all the same.
    base = Path(tempfile.mkdtemp(prefix="mailyard-site-"))
    os.chmod(base, 0o755)
    running = RedisOfASite(base / "var")
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_site_up_generates_a_redis_password_into_secrets_toml_and_redis_requires_it(site_redis: RedisOfASite) -> None:
    # secrets.toml (0600) has [redis] password, and the site's processes get it in their URL
    path = site_redis.secrets.path
    assert mode(path) == 0o600
    password = tomllib.loads(path.read_text())["redis"]["password"]
    assert len(password) >= 40 and not site_secrets.is_placeholder(password)
    assert redisconn.password_of(site_redis.site.redis_url) == password
    assert redisconn.connect(site_redis.site.redis_url).ping()
    assert site_redis.site.env()[redisconn.ENV_URL] == site_redis.site.redis_url
    # Redis refuses anyone without it
    refused_anonymously(site_redis.port)


def test_the_password_is_on_no_command_line_and_not_in_site_json(site_redis: RedisOfASite) -> None:
    password = site_redis.secrets.redis_password
    assert password
    # redis-server reads it from a 0600 file in its 0700 data directory
    assert site_redis.redis.proc is not None
    assert password not in cmdline(site_redis.redis.proc.pid)
    auth_conf = site_redis.site.data_dir / "redis" / redis_server.AUTH_CONF
    assert mode(auth_conf) == 0o600 and password in auth_conf.read_text()
    # ...and no child of the site has it on its command line (they have it in their environment)
    for child in site_redis.site.children:
        assert password not in " ".join(child.cmd), child.name
        assert "--redis-url" not in child.cmd, child.name
    # site.json holds the URL without the password
    state_text = (site_redis.site.data_dir / "site.json").read_text()
    assert password not in state_text
    state = json.loads(state_text)
    assert not redisconn.has_password(state["redis_url"])
    assert state["redis_url"] == redisconn.without_password(site_redis.site.redis_url)


def test_the_redis_data_directory_is_0700_and_its_aof_files_0600(site_redis: RedisOfASite) -> None:
    r = redisconn.connect(site_redis.site.redis_url)
    r.set("mailyard:test", "x")
    r.execute_command("BGREWRITEAOF")
    assert_private_redis_dir(site_redis.site.data_dir / "redis")


def test_a_deleted_password_is_rotated_by_the_next_start(tmp_path: Path) -> None:
    data = tmp_path / "var"
    first = RedisOfASite(data)
    old = first.secrets.redis_password
    first.stop()
    path = site_secrets.secrets_path(data)
    site_secrets.write(path, {k: v for k, v in site_secrets.load(path).items() if k != "redis"})
    second = RedisOfASite(data)
    try:
        new = second.secrets.redis_password
        assert new and new != old and tomllib.loads(path.read_text())["redis"]["password"] == new
        assert redisconn.connect(second.site.redis_url).ping()
        with pytest.raises(redis.AuthenticationError):
            redisconn.connect(redisconn.with_password(redisconn.without_password(second.site.redis_url), old)).ping()
    finally:
        second.stop()


def test_with_an_external_redis_its_password_goes_to_secrets_toml_not_site_json(redis_server: RedisServer,
                                                                               tmp_path: Path) -> None:
    url = redis_server.new_db()
    site = Site(SiteConfig(org=make_org(), config_path=tmp_path / "org.toml", data_dir=tmp_path, redis_url=url,
                           internet=False))
    made = site.load_secrets()
    site.plan()
    assert made.redis_password == redis_server.password
    assert site.env()[redisconn.ENV_URL] == url
    assert redis_server.password not in json.dumps(site.state())
    # an external Redis without a password: none is kept (the CLI then adds none)
    site = Site(SiteConfig(org=make_org(), config_path=tmp_path / "org.toml", data_dir=tmp_path,
                           redis_url="redis://127.0.0.1:1/0", internet=False))
    assert site.load_secrets().redis_password is None
    assert "redis" not in tomllib.loads(made.path.read_text())


# endregion
# region: the CLI of the local site


def test_cli_commands_of_the_operator_take_the_password_from_secrets_toml(site_redis: RedisOfASite) -> None:
    data = site_redis.site.data_dir
    result = mailyard("queue", "list", "--json", "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_cli_commands_without_the_sites_secrets_are_refused_with_a_clear_message(site_redis: RedisOfASite,
                                                                                tmp_path: Path) -> None:
    data = site_redis.site.data_dir
    password = site_redis.secrets.redis_password
    assert password
    # Another data directory with a copy of site.json but not the secrets: Redis refuses, and says why
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "site.json").write_text((data / "site.json").read_text())
    for args in (["queue", "list"], ["track", "--sender", "alice@contoso.com"], ["message", "suspend", "1"],
                 ["mailbox", "show", "bob@contoso.com"]):
        result = mailyard(*args, "--data-dir", str(elsewhere))
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr and result.stderr.startswith("error: "), result.stderr
        assert "refused the connection: it requires a password" in result.stderr, result.stderr
        assert "secrets.toml" in result.stderr and "does not exist" in result.stderr, result.stderr
    # A secrets.toml its user cannot read (another user's): refused before Redis is asked
    result = as_another_user(["queue", "list", "--data-dir", str(data)], data)
    assert result.returncode == 1, result.stderr
    assert "cannot read" in result.stderr and "secrets.toml" in result.stderr, result.stderr
    assert "only the site's operator" in result.stderr and "Traceback" not in result.stderr
    assert password not in result.stdout + result.stderr


def as_another_user(args: list[str], data: Path) -> subprocess.CompletedProcess:
    """`mailyard ARGS` as a user who may not read the site's secrets.toml: as root, a process
    that drops to nobody after loading the CLI (this machine's Python may be in /root); as
    anyone else, with the file made unreadable for the while."""
    secrets_file = site_secrets.secrets_path(data)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILYARD_")}
    if os.geteuid() == 0:
        assert all(os.stat(p).st_mode & 0o001 for p in [data, *data.parents]), "others may enter the data dir"
        code = ("import os, sys; from mailyard.cli.main import main; import mailyard.cli.queue, mailyard.hub.queue_rows;"
                " os.setgroups([]); os.setgid(65534); os.setuid(65534); sys.argv = ['mailyard', *sys.argv[1:]]; main()")
        return subprocess.run([sys.executable, "-c", code, *args], cwd="/", env=env, capture_output=True,
                              text=True, timeout=60)
    before = mode(secrets_file)
    os.chmod(secrets_file, 0)
    try:
        return subprocess.run([sys.executable, "-m", "mailyard", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
    finally:
        os.chmod(secrets_file, before)


def test_printed_and_logged_urls_are_masked(site_redis: RedisOfASite) -> None:
    data = site_redis.site.data_dir
    password = site_redis.secrets.redis_password
    assert password
    # `site status` shows Redis's URL and where its password is, never the password
    shown = mailyard("site", "status", "--data-dir", str(data))
    assert shown.returncode == 0, shown.stderr
    assert password not in shown.stdout and "Redis's password [redis]" in shown.stdout
    assert password not in mailyard("site", "status", "--data-dir", str(data), "--json").stdout
    # An error about a Redis that cannot be reached shows its URL masked
    port = redis_server.free_port()
    result = mailyard("queue", "list", "--redis-url", f"redis://:{password}@127.0.0.1:{port}/0")
    assert result.returncode == 1 and "cannot reach Redis at redis://:**@127.0.0.1:" in result.stderr, result.stderr
    assert password not in result.stderr
    result = mailyard("queue", "list", user_env={redisconn.ENV_URL: f"redis://:wrong-{password}@127.0.0.1:{site_redis.port}/0"})
    assert result.returncode == 1 and "refused the connection: wrong password" in result.stderr, result.stderr
    assert password not in result.stderr and "redis://:**@" in result.stderr
    # Redis's own log (in the site's logs/) has no password either
    assert password not in (data / "logs" / "redis.log").read_text(errors="replace")


# endregion
# region: the tests' Redis


def test_the_tests_redis_requires_its_password_and_keeps_its_files_private(redis_server: RedisServer) -> None:
    assert redisconn.password_of(redis_server.url()) == redis_server.password
    assert redisconn.connect(redis_server.url()).ping()
    assert redis_server.url(password=False) == redisconn.without_password(redis_server.url())
    refused_anonymously(redis_server.port)
    assert redis_server.proc is not None and redis_server.password not in cmdline(redis_server.proc.pid)
    assert_private_redis_dir(redis_server.data_dir)


# endregion
