"""When stderr is the journal ($JOURNAL_STREAM names fd 2's dev:ino), every
line starts with its sd-daemon priority, so `journalctl -p warning` works.
Here stderr is a file whose dev:ino is put in $JOURNAL_STREAM, the way
systemd does for a pipe to journald; tests/test_systemd_unit.py checks the
real journal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import APPS, REPO, wait_for


def _run(tmp_path: Path, args: list[str], journal: bool, state: Path) -> tuple[
        subprocess.Popen[bytes], Path]:
    log = tmp_path / "stderr.log"
    with open(log, "wb") as err:
        st = os.fstat(err.fileno())
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "ZION_TLS_STATE_DIR": str(state),
               # a stale value, inherited from a parent whose stderr was the journal
               "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}" if journal else f"{st.st_dev}:1"}
        proc = subprocess.Popen([sys.executable, "-m", "zion", *args], cwd=APPS, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    return proc, log


def _serve_once(tmp_path: Path, journal: bool) -> list[str]:
    cfg = tmp_path / "z.toml"
    # an unreadable program source: the demux falls back with a warning
    cfg.write_text('[server]\nworkers = 1\nport = 0\n[demux]\nprogram = "/no/such/prog.c"\n')
    proc, log = _run(tmp_path, ["serve", "--config", str(cfg)], journal, tmp_path)
    try:
        wait_for(lambda: "workers_ready" in log.read_text(), 30, "workers_ready")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return log.read_text().splitlines()


def test_lines_carry_their_priority_and_no_time_or_pid_when_stderr_is_the_journal(tmp_path):
    lines = _serve_once(tmp_path, journal=True)
    assert lines and all(line[:3] in ("<3>", "<4>", "<6>", "<7>") for line in lines), lines
    fallback = next(line for line in lines if "event=demux_fallback" in line)
    assert fallback.startswith("<4>"), fallback
    ready = next(line for line in lines if "event=workers_ready" in line)
    assert ready.startswith("<6>"), ready
    assert not any(" pid=" in line or line[3:].startswith("ts=") or " ts=" in line
                   for line in lines), lines


def test_no_prefix_when_journal_stream_names_another_file(tmp_path):
    lines = _serve_once(tmp_path, journal=False)
    assert lines and not any(line.startswith("<") for line in lines), lines
    assert any(line.startswith("ts=") and " pid=" in line for line in lines), lines


def test_a_config_error_is_priority_3(tmp_path):
    cfg = tmp_path / "z.toml"
    cfg.write_text("[server]\nno_such_key = 1\n")
    proc, log = _run(tmp_path, ["serve", "--config", str(cfg)], True, tmp_path)
    assert proc.wait(30) == 2
    text = log.read_text()
    assert text.startswith("<3>zion: config error: ") and "no_such_key" in text, text
