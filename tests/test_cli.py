"""The command line: help, version, and one-line configuration errors."""

from __future__ import annotations

import subprocess
import sys

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
