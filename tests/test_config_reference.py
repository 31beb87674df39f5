"""docs/configuration.md is generated from the settings declarations: the
committed file must be exactly what the declarations render to today."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO
from zion.config_reference import REGENERATE, render_markdown
from zion.settings import declared


def test_docs_configuration_md_is_the_rendered_declarations():
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == render_markdown(), (
        f"docs/configuration.md differs from the declarations in zion/settings.py; "
        f"regenerate it with: {REGENERATE}")


def test_every_declared_setting_is_in_the_reference():
    text = render_markdown()
    for d in declared():
        assert f"| `{d.name}`<br>`ZION_{d.section.upper()}_{d.name.upper()}` |" in text, d.key
        assert d.help.replace("|", "\\|").replace("\n", " ") in text, d.key


def test_the_module_prints_the_reference():
    out = subprocess.run([sys.executable, "-m", "zion.config_reference"], cwd=REPO,
                         capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout == render_markdown()
