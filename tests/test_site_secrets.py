"""The site's secrets file (mailyard.site.secrets): created 0600 whatever the umask, kept across
starts, placeholders replaced, a file others may read refused."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest

from mailyard.errors import SiteError
from mailyard.site import secrets
from mailyard.site.runner import Site, SiteConfig
from tests.conftest import make_org


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_file_is_created_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        made = secrets.ensure(tmp_path / "var")
    finally:
        os.umask(old)
    path = tmp_path / "var" / "secrets.toml"
    assert made.path == path and mode(path) == 0o600
    data = tomllib.loads(path.read_text())
    assert data["flower"]["user"] == "admin"
    values = [data["flower"]["password"], data["viewer"]["token"], data["viewer"]["metrics_token"]]
    assert len(set(values)) == 3 and all(len(v) >= 40 and not secrets.is_placeholder(v) for v in values)
    assert made.flower_basic_auth == f"admin:{data['flower']['password']}"
    assert [p.name for p in path.parent.iterdir()] == ["secrets.toml"], "no temporary file is left"


def test_the_secrets_are_kept_across_starts_and_unknown_entries_too(tmp_path: Path) -> None:
    first = secrets.ensure(tmp_path)
    path = first.path
    path.write_text(path.read_text() + '\n[backup]\nuser = "me"\n')
    stamp = path.stat().st_mtime_ns
    again = secrets.ensure(tmp_path)
    assert again.viewer_token == first.viewer_token and again.flower_basic_auth == first.flower_basic_auth
    assert again.operator == first.operator and again.operator[0] == "operator"
    assert again.get("backup", "user") == "me"
    assert path.stat().st_mtime_ns == stamp, "nothing was missing: the file is not rewritten"


@pytest.mark.parametrize("placeholder", ["", "  ", "contoso-demo-viewer-token", "contoso-demo-token-change-me",
                                         "Change-Me-Please", "changeme"])
def test_a_placeholder_or_empty_value_is_replaced_and_a_value_of_ones_own_kept(tmp_path: Path,
                                                                               placeholder: str) -> None:
    path = secrets.secrets_path(tmp_path)
    secrets.write(path, {"viewer": {"token": placeholder, "metrics_token": "my own metrics token"}})
    made = secrets.ensure(tmp_path)
    assert made.viewer_token != placeholder and not secrets.is_placeholder(made.viewer_token)
    assert made.metrics_token == "my own metrics token"
    assert tomllib.loads(path.read_text())["viewer"]["token"] == made.viewer_token and mode(path) == 0o600


def test_a_file_others_may_read_is_refused(tmp_path: Path) -> None:
    made = secrets.ensure(tmp_path)
    os.chmod(made.path, 0o644)  # (as a careless copy would leave it)
    with pytest.raises(SiteError, match="may be read by other users"):
        secrets.ensure(tmp_path)


def test_a_bad_file_is_refused_with_its_name(tmp_path: Path) -> None:
    path = secrets.secrets_path(tmp_path)
    secrets.write(path, {"viewer": {"token": "x"}})
    path.write_text("[viewer\n")  # (keeps mode 0600)
    with pytest.raises(SiteError, match=r"secrets\.toml is not valid TOML"):
        secrets.ensure(tmp_path)
    secrets.write(path, {"flower": {"user": "a:b", "password": "pw"}})
    with pytest.raises(SiteError, match="without ':'"):
        _ = secrets.ensure(tmp_path).flower_basic_auth


def test_the_runner_gives_each_secret_only_to_its_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILYARD_VIEWER_TOKEN", "contoso-demo-viewer-token")
    monkeypatch.setenv("FLOWER_UNAUTHENTICATED_API", "true")
    site = Site(SiteConfig(org=make_org(), config_path=tmp_path / "org.toml", data_dir=tmp_path,
                           redis_url="redis://127.0.0.1:1/0", internet=False))
    made = site.load_secrets()
    site.plan()
    env = site.env()
    assert not {"MAILYARD_VIEWER_TOKEN", "FLOWER_UNAUTHENTICATED_API", "FLOWER_BASIC_AUTH"} & set(env)
    by_role = {c.role: site.env_for(c, env) for c in site.children}
    assert by_role["flower"]["FLOWER_BASIC_AUTH"] == made.flower_basic_auth
    assert by_role["viewer"]["MAILYARD_VIEWER_TOKEN"] == made.viewer_token
    assert by_role["viewer"]["MAILYARD_VIEWER_METRICS_TOKEN"] == made.metrics_token
    for role in ("hub", "mailbox"):
        assert not {k for k in by_role[role] if "TOKEN" in k or k.startswith("FLOWER_")}, role
    for child in site.children:
        assert made.viewer_token not in " ".join(child.cmd) and made.flower_basic_auth not in " ".join(child.cmd)
    assert site.state()["secrets_file"] == str(made.path)


def test_a_site_runs_with_generated_passwords_where_the_file_has_the_demos(tmp_path: Path) -> None:
    from mailyard.passwords import hash_password

    org = make_org()
    own = hash_password("erin-own-password")
    org = org.model_copy(update={"mailboxes": [
        mb.model_copy(update={"password": own}) if mb.address == "erin@contoso.com" else mb for mb in org.mailboxes]})
    ran, kept = secrets.with_site_passwords(org, tmp_path)
    generated = kept.values["mailboxes"]
    by_address = {mb.address: mb.password for mb in ran.mailboxes}
    assert "erin@contoso.com" not in generated and by_address["erin@contoso.com"] == own, "its own is kept"
    for mb in org.mailboxes:
        if mb.password.endswith("-demo-password"):
            assert by_address[mb.address] == generated[mb.address] != mb.password
            assert len(generated[mb.address]) >= 40
    operator = next(op for op in ran.operators if op.name == "operator")
    assert operator.password == kept.operator[1] and not secrets.is_placeholder(operator.password)
    again, _ = secrets.with_site_passwords(make_org(), tmp_path)
    assert {mb.address: mb.password for mb in again.mailboxes}["bob@contoso.com"] == by_address["bob@contoso.com"]
    assert mode(kept.path) == 0o600
