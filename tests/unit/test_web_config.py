"""The [web] section of the node config, and `hasync web passwd`."""

from __future__ import annotations

import io
import secrets
from pathlib import Path

import pytest

from hasync import cli, config
from hasync.config import ConfigError, WebConfig
from hasync.web.password import hash_password, verify_password


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    config.write_key_file(tmp_path / "auth-1.key", config.generate_auth_key())
    return tmp_path


def document(**web) -> dict:
    # a control socket nobody listens on: `web passwd`'s reload request finds no daemon
    data = {"node": {"hostname": "fw1", "state_dir": "/var/lib/hasync-test",
                     "control_socket": f"@hsx-web-none-{secrets.token_hex(4)}"},
            "security": {"auth_key_id": 1, "auth_keys": {"1": "auth-1.key"}},
            "sync": {"enabled": False}}
    if web:
        data["web"] = web
    return data


def test_defaults_are_off_and_local_only(keydir):
    cfg = config.parse(document(), base_dir=keydir)
    assert cfg.web == WebConfig()
    assert not cfg.web.enabled and cfg.web.bind == ("127.0.0.1",) and cfg.web.port == 8443
    assert cfg.web_cert_file == Path("/var/lib/hasync-test/web-cert.pem")
    assert cfg.web_key_file == Path("/var/lib/hasync-test/web-key.pem")


def test_values_round_trip_through_save(keydir):
    h = hash_password("correct horse")
    cfg = config.parse(document(enabled=True, bind=["198.51.100.1", "2001:db8::1"], port=9443,
                                password_hash=h, cert_file="c.pem", key_file="/etc/k.pem"),
                       base_dir=keydir)
    assert cfg.web.bind == ("198.51.100.1", "2001:db8::1") and cfg.web.port == 9443
    assert cfg.web_cert_file == keydir / "c.pem" and cfg.web_key_file == Path("/etc/k.pem")
    again = config.parse(config.to_toml_dict(cfg), base_dir=keydir)
    assert again.web == cfg.web


@pytest.mark.parametrize("web, field, word", [
    ({"bind": ["not-an-ip"]}, "web.bind[0]", "not a valid IP"),
    ({"bind": []}, "web.bind", "at least one"),
    ({"port": 0}, "web.port", "out of range"),
    ({"enabled": "yes"}, "web.enabled", "true or false"),
    ({"password_hash": "plaintext"}, "web.password_hash", "hasync web passwd"),
    ({"password_hash": "scrypt$40$8$1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA"}, "web.password_hash", "range"),
    ({"listen": "x"}, "web.listen", "unknown key"),
])
def test_bad_values_name_the_field(keydir, web, field, word):
    with pytest.raises(ConfigError) as err:
        config.parse(document(**web), base_dir=keydir)
    assert err.value.field == field
    assert word.lower() in err.value.reason.lower()


def test_web_passwd_sets_a_hash_that_verifies(keydir, monkeypatch, capsys):
    path = keydir / "hasync.toml"
    config.save(config.parse(document(enabled=True), base_dir=keydir), path)
    monkeypatch.setattr("sys.stdin", io.StringIO("a long enough secret\n"))
    assert cli.main(["--config", str(path), "web", "passwd", "--stdin"]) == 0
    stored = config.load(path).web.password_hash
    assert verify_password("a long enough secret", stored)
    assert not verify_password("a long enough secreT", stored)
    assert config.load(path).web.enabled  # the rest of [web] is kept


def test_web_passwd_refuses_a_short_password(keydir, monkeypatch):
    path = keydir / "hasync.toml"
    config.save(config.parse(document(), base_dir=keydir), path)
    before = path.read_bytes()
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert cli.main(["--config", str(path), "web", "passwd", "--stdin"]) == 1
    assert path.read_bytes() == before
