"""The program source ships in the package and is found from an install."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from tests.conftest import REPO
from zion.demux.program import source_path


def test_program_ships_in_the_wheel(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, timeout=300, capture_output=True)
    wheel = next(tmp_path.glob("zion-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        shipped = zf.read("zion/_data/zion_demux.c")
        config = zf.read("zion/_data/zion.toml")
        zf.extractall(tmp_path / "installed")
    assert shipped == (REPO / "bpf" / "zion_demux.c").read_bytes()
    assert config == (REPO / "config" / "zion.toml").read_bytes()
    out = subprocess.run([sys.executable, "-c", "from zion.demux.program import source_path;"
                          "p = source_path(); print(p, p.is_file())"],
                         capture_output=True, text=True, cwd=tmp_path, check=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "installed")}).stdout
    assert out.strip() == f"{tmp_path / 'installed' / 'zion' / '_data' / 'zion_demux.c'} True"
    assert source_path().read_text() == shipped.decode()
