#!/usr/bin/env python3
"""Print a container seccomp profile that allows bpf(2) whatever the capabilities.

    python3 scripts/seccomp_allow_bpf.py /usr/share/containers/seccomp.json > zion-seccomp.json
    podman run --cap-add BPF --security-opt seccomp=zion-seccomp.json ...

Podman's default profile (containers-common, Debian 12's 0.50.1) allows bpf only
to a container with CAP_SYS_ADMIN and answers EPERM to any other, so
`--cap-add BPF` alone leaves zion's master with the capability and no system call
to use it. This keeps every other rule of the given profile (Docker's and
containers-common's share the format) and replaces the rules that name bpf with
one that allows it: the kernel still asks for CAP_BPF. Only the master, which
loads the demux, uses bpf; the workers drop every capability.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def allow_bpf(profile: dict[str, Any]) -> dict[str, Any]:
    rules = []
    for rule in profile.get("syscalls") or []:
        names = [n for n in rule.get("names", []) if n != "bpf"]
        if names:
            rules.append({**rule, "names": names})
    # conditional rules (includes/excludes caps) on the same call would clash
    rules.append({"names": ["bpf"], "action": "SCMP_ACT_ALLOW", "args": []})
    return {**profile, "syscalls": rules}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print("usage: seccomp_allow_bpf.py PROFILE.json (- for stdin)", file=sys.stderr)
        return 2
    text = sys.stdin.read() if argv[0] == "-" else Path(argv[0]).read_text()
    json.dump(allow_bpf(json.loads(text)), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
