"""docs/configuration.md, rendered from the settings declarations.

Every setting is declared once, in zion/settings.py; this module turns those
declarations into the Markdown reference a reader looks things up in (key,
type, default, environment variable, flag, what it does). The file in the
tree is generated, never edited: tests/test_config_reference.py fails when it
differs from `render_markdown()`. Regenerate it with

    .venv/bin/python -m zion.config_reference > docs/configuration.md
"""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import Any

from zion.settings import Declared, declared

REGENERATE = ".venv/bin/python -m zion.config_reference > docs/configuration.md"

_HEADER = f"""\
<!-- GENERATED from the declarations in zion/settings.py by zion/config_reference.py.
     Do not edit: change the declaration, then run
     {REGENERATE}
     (tests/test_config_reference.py fails while this file and the declarations differ). -->

# Configuration reference

Every setting is declared once, in [`zion/settings.py`](../zion/settings.py): its type,
default, check, help and (for most) its command-line flag. This page, the commented
default file [`config/zion.toml`](../config/zion.toml) and `zion serve --help` are all
generated from those declarations.

Where a value comes from, lowest precedence first:

1. the declared default (listed below and in `config/zion.toml`),
2. `zion serve --config FILE`: a TOML file with any subset of the keys below,
3. the environment: `ZION_<SECTION>_<KEY>`, e.g. `ZION_SERVER_PORT=9443`
   (`WEB_CONCURRENCY`, uvicorn's and gunicorn's convention, sets `server.workers`
   below every zion source),
4. command-line flags.

Everything is validated once, in the master, into one frozen settings object the
workers inherit. An unknown section or key, a wrong type or an out-of-range value is
one line naming the key and where the value came from, and exit code 2:

```
zion: config error: limits.max_body_size (from ZION_LIMITS_MAX_BODY_SIZE): expected int, got 'lots'
```

A boolean given in the environment is one of `1 0 true false yes no on off`; a boolean
flag has a `--no-` form. What the limits do to a client that exceeds them is in
[http.md](http.md#limits).
"""


def _type_name(t: Any) -> str:
    if isinstance(t, type) and issubclass(t, StrEnum):
        return " \\| ".join(f'`"{m.value}"`' for m in t)
    return f"{getattr(t, '__name__', t)}"


def _default(d: Declared) -> str:
    value = d.default
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, StrEnum):
        return f'`"{value.value}"`'
    if isinstance(value, str):
        return '`""`' if value == "" else f"`{value!r}`".replace("'", '"')
    return f"`{value!r}`"


def _flag(d: Declared) -> str:
    if d.flag is None:
        return "no flag"
    if d.flag.name == "app":
        return "`APP` (positional)"
    if d.type is bool:
        names = [f"`{d.flag.name}` / `--no-{d.flag.name[2:]}`"]
    else:
        metavar = d.flag.metavar or (
            "{" + ",".join(m.value for m in d.type) + "}"
            if isinstance(d.type, type) and issubclass(d.type, StrEnum) else d.name.upper())
        names = [f"`{d.flag.name} {metavar}`"]
        if d.flag.repeat is not None:
            names[0] += " (repeatable)"
    names += [f"`{alias}`" for alias in d.flag.aliases]
    return ", ".join(names)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown() -> str:
    out = [_HEADER]
    section = None
    for d in declared():
        if d.section != section:
            section = d.section
            out.append(f"\n## `[{section}]`\n")
            out.append("| key | type | default | flag | what it does |")
            out.append("|---|---|---|---|---|")
        env = f"ZION_{d.section.upper()}_{d.name.upper()}"
        out.append(f"| `{d.name}`<br>`{env}` | {_type_name(d.type)} | {_default(d)} "
                   f"| {_flag(d)} | {_cell(d.help)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        sys.stderr.write(f"usage: python -m zion.config_reference > docs/configuration.md\n"
                         f"(no arguments; got {' '.join(argv)})\n")
        return 2
    sys.stdout.write(render_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
