"""The command line: help, version, and one-line configuration errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import APPS, REPO
from zion import __version__
from zion.errors import ConfigError
from zion.settings import load_settings


def zion(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zion", *args], capture_output=True,
                          text=True, timeout=30, cwd=APPS,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **(env or {})})


def test_version_and_help():
    assert zion("--version").stdout.strip() == f"zion {__version__}"
    help_text = zion("serve", "--help").stdout
    for flag in ("--host", "--port", "--workers", "--config", "--root", "--ssl-certfile",
                 "--ssl-keyfile", "--no-bpf-demux", "--log-format", "--log-level"):
        assert flag in help_text


@pytest.mark.parametrize("args, env, expect", [
    (["--port", "70000"], {}, "server.port (from command line): 70000 must be between 0"),
    ([], {"ZION_LIMITS_MAX_BODY_SIZE": "lots"},
     "limits.max_body_size (from ZION_LIMITS_MAX_BODY_SIZE): expected int"),
    ([], {"ZION_SERVER_PROT": "1"}, "unknown key server.prot"),
    (["--root", "/does/not/exist"], {}, "is not a directory"),
    (["--reload", "--reload-dir", "/does/not/exist"], {},
     "server.reload_dirs (from command line): '/does/not/exist' is not a directory"),
    (["notanapp"], {}, "must be of the form module:attribute"),
])
def test_bad_values_are_one_line_exit_2(args, env, expect):
    result = zion("serve", *args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("zion: config error: ") and expect in lines[0]


def test_bad_config_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = \n")
    result = zion("serve", "--config", str(bad))
    assert result.returncode == 2 and f"{bad}: invalid TOML" in result.stderr
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b"[server]\n# caf\xe9\n")
    result = zion("serve", "--config", str(latin1))
    assert result.returncode == 2 and result.stderr.strip() == (
        f"zion: config error: {latin1}: invalid TOML: byte 0xe9 is not UTF-8 (at line 2)")
    typo = tmp_path / "typo.toml"
    typo.write_text("[limits]\nmax_body = 5\n")
    result = zion("serve", "--config", str(typo))
    assert result.returncode == 2 and "unknown key limits.max_body" in result.stderr


def test_precedence(tmp_path):
    cfg = tmp_path / "z.toml"
    cfg.write_text("[server]\nport = 9000\nworkers = 3\n[limits]\nheader_timeout = 4\n")
    env = {"ZION_SERVER_PORT": "9100", "ZION_APP_SECRET": "not ours"}
    settings = load_settings(str(cfg), {"server": {"workers": 5}}, env)
    assert settings.server.port == 9100          # env beats file
    assert settings.server.workers == 5          # CLI beats env and file
    assert settings.limits.header_timeout == 4.0  # file beats default
    assert settings.server.host == "127.0.0.1"   # embedded default
    with pytest.raises(ConfigError):
        load_settings(None, {"demux": {"mode": "random"}}, {})
    disabled = load_settings(None, {"demux": {"enabled": False}}, {})
    assert disabled.demux_disabled_by == "command line"


@pytest.mark.parametrize("args, says", [
    (["--http", "httptools"], "--http httptools: zion parses HTTP/1.1 with httptools"),
    (["--loop", "asyncio"], "--loop asyncio: zion always runs uvloop"),
    (["--ws", "wsproto"], "--ws wsproto: zion's WebSocket is built in"),
    (["--interface=wsgi"], "--interface wsgi: zion tells ASGI 3 from ASGI 2 apps itself"),
])
def test_uvicorn_only_options_say_what_zion_does_instead(args, says):
    result = zion("serve", *args)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(f"zion: {says}"), result.stderr


def test_every_flag_shows_its_config_key():
    from zion.settings import declared

    help_text = " ".join(zion("serve", "--help").stdout.split())
    for d in declared():
        if d.flag is not None:
            assert f"[{d.section}] {d.name})" in help_text, d.key
    for flag in ("--limit-max-body-size", "--ws-max-queue", "--log-config",
                 "--proxy-protocol-trust-forwarded", "--ssl-groups"):
        assert flag in help_text


def test_argument_and_config_errors_are_json_lines_with_log_format_json(tmp_path):
    """With --log-format json (or ZION_LOG_FORMAT=json), the errors that come
    before the configuration is read are JSON lines too."""
    import json

    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = \n")
    for args, env, event, says in (
        (["--log-format", "json", "--bogus"], {}, "usage_error", "unrecognized arguments"),
        (["--log-format=json", "--http", "h11"], {}, "usage_error", "--http h11"),
        (["--port", "99999"], {"ZION_LOG_FORMAT": "json"}, "config_error", "server.port"),
        (["--log-format", "json", "--config", str(bad)], {}, "config_error", "invalid TOML"),
        (["--log-format", "json", "--log-config", str(tmp_path)], {}, "config_error",
         "log.config"),
    ):
        result = zion("serve", *args, env=env)
        assert result.returncode == 2, result
        lines = [json.loads(line) for line in result.stderr.splitlines()]
        assert len(lines) == 1 and lines[0]["event"] == event and lines[0]["level"] == "error"
        assert says in lines[0]["error"], lines


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_limit_max_body_size_flag_and_zero_is_no_limit(start_zion, tmp_path, http):
    """--limit-max-body-size BYTES; 0 = no limit (it used to mean no body at
    all: a 5-byte POST got 413). The default stays 10 MiB."""
    big = tmp_path / "big"
    big.write_bytes(b"x" * (12 * 1024 * 1024))
    small = tmp_path / "small"
    small.write_bytes(b"x" * 2000)

    def post(port: int, body: Path) -> str:
        return subprocess.run(
            ["curl", "-sk", http, "--max-time", "20", "--data-binary", f"@{body}",
             "-w", " %{http_code}", f"https://127.0.0.1:{port}/"],
            capture_output=True, text=True, timeout=30).stdout

    unlimited = start_zion("raw_app:app", "--limit-max-body-size", "0", workers=1)
    assert post(unlimited.port, big).endswith(f"got {12 * 1024 * 1024} bytes 200")
    assert post(unlimited.port, small).endswith("got 2000 bytes 200")
    unlimited.stop()
    limited = start_zion("raw_app:app", "--limit-max-body-size", "1000", workers=1)
    assert post(limited.port, small).endswith(" 413")
    if http == "--http1.1":
        # (Over HTTP/2 curl reports the 12 MiB upload to the default limit as
        # a stream closed with no status: the exchange's concern, not the flag's.)
        default = start_zion("raw_app:app", workers=1)
        assert post(default.port, big).endswith(" 413")
