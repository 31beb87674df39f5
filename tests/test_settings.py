"""Settings declared once: defaults, TOML, environment, flags and the
shipped config/zion.toml all come from the same declarations."""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from zion.cli import _cli_overrides, _parser
from zion.errors import ConfigError
from zion.settings import (
    DemuxMode,
    LifespanMode,
    declared,
    env_overrides,
    load_settings,
    render_default_toml,
)


def test_config_zion_toml_is_the_rendered_declarations():
    shipped = (REPO / "config" / "zion.toml").read_text()
    assert shipped == render_default_toml(), (
        "config/zion.toml is out of date; regenerate it with: python -c 'from zion.settings "
        "import render_default_toml; print(render_default_toml(), end=\"\")' > config/zion.toml")


def test_defaults_come_from_the_declarations():
    settings = load_settings(None, {}, {})
    for d in declared():
        assert getattr(getattr(settings, d.section), d.name) == d.default, d.key


def test_every_declared_setting_has_an_environment_variable():
    for d in declared():
        name = f"ZION_{d.section.upper()}_{d.name.upper()}"
        assert env_overrides({name: "v"}) == {d.section: {d.name: "v"}}, name


def test_flags_map_to_their_settings(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    args = _parser().parse_args([
        "serve", "pkg:app", "--port", "9999", "--factory", "--lifespan", "off",
        "--reload-dir", str(a), "--reload-dir", str(b), "--no-bpf-demux", "--demux", "hash",
        "--ws-max-size", "1000", "--no-ws-per-message-deflate", "--log-level", "debug"])
    s = load_settings(None, _cli_overrides(args), {})
    assert (s.server.app, s.server.port, s.server.factory) == ("pkg:app", 9999, True)
    assert s.server.lifespan is LifespanMode.OFF and s.server.reload_dirs == f"{a}:{b}"
    assert not s.demux.enabled and s.demux_disabled_by == "command line"
    assert s.demux.mode is DemuxMode.HASH
    assert (s.websocket.max_size, s.websocket.per_message_deflate) == (1000, False)
    assert s.log.level == "debug"


def test_precedence_file_then_env_then_flags(tmp_path):
    cfg = tmp_path / "z.toml"
    cfg.write_text("[server]\nport = 1111\nworkers = 3\n[limits]\nmax_headers = 7\n")
    s = load_settings(str(cfg), {"server": {"port": 3333}},
                      {"ZION_SERVER_PORT": "2222", "ZION_LIMITS_MAX_HEADERS": "9"})
    assert (s.server.port, s.server.workers, s.limits.max_headers) == (3333, 3, 9)


@pytest.mark.parametrize(("env", "message"), [
    ({"ZION_SERVER_PORT": "70000"},
     "server.port (from ZION_SERVER_PORT): 70000 must be between 0 and 65535"),
    ({"ZION_DEMUX_MODE": "random"},
     "demux.mode (from ZION_DEMUX_MODE): 'random' must be one of least-loaded, hash, cpu"),
    ({"ZION_LIMITS_HEADER_TIMEOUT": "0"}, "limits.header_timeout (from "
     "ZION_LIMITS_HEADER_TIMEOUT): 0.0 must be greater than 0"),
    ({"ZION_SERVER_NOPE": "1"}, "ZION_SERVER_NOPE: unknown key server.nope"),
    ({"ZION_WEBSOCKET_PER_MESSAGE_DEFLATE": "maybe"},
     "websocket.per_message_deflate (from ZION_WEBSOCKET_PER_MESSAGE_DEFLATE): expected bool"),
    # Over HTTP/3 a client without a certificate would be served.
    ({"ZION_TLS_HTTP3": "true", "ZION_TLS_CERT_REQS": "optional", "ZION_TLS_CA_CERTS": "ca.pem"},
     "tls.http3 (from ZION_TLS_HTTP3): HTTP/3 cannot go with tls.cert_reqs optional (from "
     "ZION_TLS_CERT_REQS): its QUIC stack never asks for a client certificate"),
])
def test_a_bad_value_is_one_line_naming_key_and_origin(env, message):
    with pytest.raises(ConfigError) as info:
        load_settings(None, {}, env)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_foreign_zion_variables_are_ignored():
    load_settings(None, {}, {"ZION_ENV": "production", "ZION_APP_SECRET": "x"})


def test_broken_toml_names_file_and_line(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[server]\nport = \n")
    with pytest.raises(ConfigError) as info:
        load_settings(str(cfg), {}, {})
    assert str(cfg) in str(info.value) and "line 2" in str(info.value)


def test_a_config_file_that_is_not_utf8_names_file_and_line(tmp_path):
    cfg = tmp_path / "latin1.toml"
    cfg.write_bytes(b"[server]\nhost = \"127.0.0.1\"\n# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_settings(str(cfg), {}, {})
    assert str(info.value) == f"{cfg}: invalid TOML: byte 0xe9 is not UTF-8 (at line 3)"


@pytest.mark.parametrize("key", ["app_dir", "reload_dirs"])
def test_app_and_reload_dirs_must_exist(tmp_path, key):
    env = f"ZION_SERVER_{key.upper()}"
    ok = load_settings(None, {}, {env: str(tmp_path)})
    assert getattr(ok.server, key) == str(tmp_path)
    missing = tmp_path / "gone"
    value = f"{tmp_path}:{missing}" if key == "reload_dirs" else str(missing)
    with pytest.raises(ConfigError) as info:
        load_settings(None, {}, {env: value})
    assert str(info.value) == f"server.{key} (from {env}): {str(missing)!r} is not a directory"


def test_uvicorn_names_web_concurrency_and_repeatable_headers():
    args = _parser().parse_args([
        "serve", "--timeout-keep-alive", "7", "--timeout-graceful-shutdown", "3",
        "--limit-concurrency", "50", "--header", "x-a: 1", "--header", "x-b: two words",
        "--no-server-header", "--log-level", "critical"])
    s = load_settings(None, _cli_overrides(args), {"WEB_CONCURRENCY": "3"})
    assert (s.limits.keepalive_timeout, s.supervisor.drain_timeout) == (7.0, 3.0)
    assert s.limits.concurrency == 50 and s.server.workers == 3
    assert s.server.headers == "x-a: 1\nx-b: two words" and not s.server.server_header
    assert s.log.level == "critical"
    # WEB_CONCURRENCY is below every zion source
    assert load_settings(None, {}, {"WEB_CONCURRENCY": "3", "ZION_SERVER_WORKERS": "5"}
                         ).server.workers == 5
    with pytest.raises(ConfigError, match="each header must be NAME: VALUE"):
        load_settings(None, {"server": {"headers": "no colon here"}}, {})


def test_env_file_feeds_settings_and_a_missing_one_is_a_config_error(tmp_path):
    import subprocess
    import sys

    env_file = tmp_path / "zion.env"
    env_file.write_text("ZION_SERVER_PORT=70000\n")
    out = subprocess.run([sys.executable, "-m", "zion", "serve", "--env-file", str(env_file)],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 2 and "server.port (from ZION_SERVER_PORT)" in out.stderr
    out = subprocess.run([sys.executable, "-m", "zion", "serve", "--env-file",
                          str(tmp_path / "missing.env")], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 2 and "missing.env: no such file" in out.stderr


def test_proxy_protocol_settings():
    import subprocess
    import sys

    settings = load_settings(None, {"server": {"proxy_protocol": "v2",
                                               "proxy_allow_ips": "10.0.0.0/8, ::1"}}, {})
    assert settings.server.proxy_protocol == "v2"
    with pytest.raises(ConfigError, match="must be one of off, v1, v2, auto"):
        load_settings(None, {"server": {"proxy_protocol": "v3"}}, {})
    with pytest.raises(ConfigError, match="not an address or a network"):
        load_settings(None, {"server": {"proxy_allow_ips": "10.0.0.0/33"}}, {})
    # Empty: nothing could connect, so it is an error only when the protocol is on.
    assert load_settings(None, {"server": {"proxy_allow_ips": ""}}, {})
    out = subprocess.run([sys.executable, "-m", "zion", "serve", "--proxy-protocol", "auto",
                          "--proxy-allow-ips", ""], capture_output=True, text=True, timeout=60,
                         cwd=REPO)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "server.proxy_allow_ips (from command line): empty" in out.stderr
