"""zttp sits behind zion/http/zttp_shim.py, as bcc behind zion/demux/shim.py:
no other module of zion imports it, so the frame layer can be replaced or
upgraded in one place (issue 19, Must-have 1)."""

from __future__ import annotations

import ast
from pathlib import Path

import zion

ZION = Path(zion.__file__).resolve().parent
SHIM = ZION / "http" / "zttp_shim.py"


def _imports_zttp(tree: ast.AST) -> list[int]:
    """Lines of every import of zttp or one of its submodules, wherever it is
    (module level, a function, under TYPE_CHECKING)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        if any(name == "zttp" or name.startswith("zttp.") for name in names):
            lines.append(node.lineno)
    return lines


def test_only_the_shim_imports_zttp() -> None:
    offenders = []
    for path in sorted(ZION.rglob("*.py")):
        if path == SHIM:
            continue
        lines = _imports_zttp(ast.parse(path.read_text(), str(path)))
        offenders += [f"{path.relative_to(ZION.parent)}:{line}" for line in lines]
    assert not offenders, f"zttp imported outside zion/http/zttp_shim.py: {offenders}"


def test_the_walk_sees_the_shim_and_every_form_of_import() -> None:
    # The test above proves nothing if it finds no module or misses a form.
    assert _imports_zttp(ast.parse(SHIM.read_text()))
    for source in ("import zttp", "import os, zttp._zttp as z", "from zttp import Data",
                   "from zttp.error_codes import H2ErrorCode",
                   "def f():\n    import zttp\n",
                   "if TYPE_CHECKING:\n    from zttp import Request\n"):
        assert _imports_zttp(ast.parse(source)), source
    for source in ("from . import zttp_shim", "import zttpx", "from zion.http import zttp_shim"):
        assert not _imports_zttp(ast.parse(source)), source
    assert len(list(ZION.rglob("*.py"))) > 50
