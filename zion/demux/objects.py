"""Compile once, load anywhere: the demux program as a kept object.

The program reads only its sk_reuseport_md context (uapi) and its own maps,
so its bytecode does not depend on the running kernel's headers. bcc
compiles bpf/zion_demux.c where headers exist (scripts/setup.sh, a wheel or
image build, or the first start that has them) and zion keeps what loading
needs: the instructions, the license, each map the program uses (as the
kernel described it) and where the program refers to each: an
`ld_imm64 dst, map` (opcode 0x18, src_reg BPF_PSEUDO_MAP_FD = 1) whose imm
is the map's descriptor in the compiling process. At load the maps are
created again and each such imm is rewritten to the new descriptor, as
libbpf's relocations do; then bpf(BPF_PROG_LOAD), no LLVM, no headers.

Only the (mode, migrate) variant is compiled in; workers, stall threshold
and heartbeat pace are written into the zion_config map at load, so one
object per variant serves every configuration.

An object is used only if it was compiled from the same program text (its
SHA-256, the sockarray's descriptor number left out) in this format; one
that does not match, or that the kernel refuses, is rebuilt when bcc and
headers are at hand, else ignored, with a line saying which and why.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import json
import os
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

from zion.demux import headers, shim
from zion.demux.program import ProgramConfig, program_text
from zion.demux.shim import ShimError, ShimOp

FORMAT = 1
_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1
# The map the program refers to but userspace creates (bpf/README.md).
SOCKARRAY = "zion_socks"
CONFIG = "zion_config"
SLOTS = "zion_slots"


class ObjectError(Exception):
    """An object that cannot be used; the message says why."""


@dataclass(frozen=True)
class MapSpec:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


@dataclass(frozen=True)
class DemuxObject:
    text_sha256: str
    mode: str
    migrate: bool
    insns: bytes
    license: str
    maps: tuple[MapSpec, ...]
    relocs: tuple[tuple[int, str], ...]  # (instruction index, map name)
    text: str  # exactly what bcc compiled (zion doctor --ebpf)
    built_with: str
    path: Path | None = field(default=None, compare=False)

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "text_sha256": self.text_sha256, "mode": self.mode,
            "migrate": self.migrate, "license": self.license,
            "insns": base64.b64encode(self.insns).decode(),
            "maps": [m.__dict__ for m in self.maps], "relocs": [list(r) for r in self.relocs],
            "text": self.text, "built_with": self.built_with}, indent=1)

    @classmethod
    def from_json(cls, data: str, path: Path | None = None) -> DemuxObject:
        raw: dict[str, Any] = json.loads(data)
        if raw.get("format") != FORMAT:
            raise ObjectError(f"format {raw.get('format')!r}, this zion reads {FORMAT}")
        obj = cls(raw["text_sha256"], raw["mode"], bool(raw["migrate"]),
                  base64.b64decode(raw["insns"]), raw["license"],
                  tuple(MapSpec(**m) for m in raw["maps"]),
                  tuple((int(i), str(n)) for i, n in raw["relocs"]), raw["text"],
                  raw["built_with"], path)
        obj.check()
        return obj

    def check(self) -> None:
        """Every reference points at an ld_imm64 of a known map."""
        names = {m.name for m in self.maps} | {SOCKARRAY}
        count = len(self.insns) // 8
        if len(self.insns) % 8 or not count:
            raise ObjectError("the bytecode is not whole instructions")
        for index, name in self.relocs:
            if not 0 <= index < count or self.insns[index * 8] != _LD_IMM64:
                raise ObjectError(f"map reference {index} is not an ld_imm64")
            if name not in names:
                raise ObjectError(f"map reference {index} names an unknown map {name!r}")


def text_sha256(source: str, mode: str, migrate: bool) -> str:
    """What an object must have been compiled from (the sockarray's
    descriptor number, which the loader rewrites, left out)."""
    return hashlib.sha256(program_text(source, 0, mode, migrate).encode()).hexdigest()


def file_name(source: str, mode: str, migrate: bool, custom: bool) -> str:
    variant = f"{mode}-{'migrate' if migrate else 'select'}"
    if custom:  # a program of one's own ([demux] program) never replaces the shipped one
        return f"program-{hashlib.sha256(source.encode()).hexdigest()[:12]}-{variant}.json"
    return f"zion_demux-{variant}.json"


def package_dir() -> Path:
    """Objects kept with the installation (scripts/setup.sh writes them)."""
    return Path(str(resources.files("zion") / "_data" / "objects"))


def locations(configured: str, state_dir: Path) -> list[Path]:
    if configured:
        return [Path(configured)]
    return [package_dir(), state_dir / "demux-objects"]


def find(dirs: list[Path], name: str, sha: str) -> tuple[DemuxObject | None, list[str]]:
    """The first usable object in `dirs`, and a line for each one ignored."""
    ignored = []
    for directory in dirs:
        path = directory / name
        try:
            data = path.read_text()
        except FileNotFoundError:
            continue
        except OSError as exc:
            ignored.append(f"{path}: {headers.errno_name(exc.errno)}")
            continue
        try:
            obj = DemuxObject.from_json(data, path)
        except (ObjectError, ValueError, KeyError, TypeError) as exc:
            ignored.append(f"{path}: unreadable object ({exc})")
            continue
        if obj.text_sha256 != sha:
            ignored.append(f"{path}: compiled from another program text "
                           f"(sha256 {obj.text_sha256[:12]}, this one {sha[:12]})")
            continue
        return obj, ignored
    return None, ignored


def save(obj: DemuxObject, dirs: list[Path], name: str) -> Path:
    """Write to the first directory that takes it, readable by everyone (the
    service user may not be who compiled it); raise OSError if none does."""
    failure: OSError | None = None
    for directory in dirs:
        try:
            headers.make_shared_dir(directory)
            fd, tmp = tempfile.mkstemp(prefix=".obj-", dir=directory)
            with os.fdopen(fd, "w") as fh:
                fh.write(obj.to_json())
            os.chmod(tmp, 0o644)
            os.replace(tmp, directory / name)
            return directory / name
        except OSError as exc:
            failure = failure or exc
    assert failure is not None
    raise failure


def compile_object(bcc: ModuleType, source: str, mode: str, migrate: bool,
                   kernel_source: str | None) -> DemuxObject:
    """bcc compiles; keep the bytecode and where each map is referred to.
    Runs where LLVM may be mapped: the compile helper, or set-up."""
    # The sockarray is not bcc's: its reference is `bpf_pseudo_fd(1, fd)`.
    # Any descriptor number this process holds and bcc cannot reuse will do.
    placeholder = os.open(os.devnull, os.O_RDONLY)
    try:
        text = program_text(source, placeholder, mode, migrate)
        compiled = shim.compile_program(bcc, text, kernel_source)
        try:
            maps: dict[int, MapSpec] = {}
            relocs: list[tuple[int, str]] = []
            for index in range(len(compiled.insns) // 8):
                code, regs, _off, imm = struct.unpack_from("<BBhi", compiled.insns, index * 8)
                if code != _LD_IMM64 or regs >> 4 == 0:
                    continue
                if regs >> 4 != _PSEUDO_MAP_FD:
                    raise ShimError(ShimOp.COMPILE, None, "", f"instruction {index}: "
                                    f"ld_imm64 src_reg {regs >> 4} is not a map descriptor")
                if imm == placeholder:
                    relocs.append((index, SOCKARRAY))
                    continue
                if imm not in maps:
                    maps[imm] = MapSpec(*shim.map_info(imm))
                relocs.append((index, maps[imm].name))
            version = getattr(bcc, "__version__", "?")
            built = (f"bcc {version} on Linux {os.uname().release}, "
                     f"{datetime.datetime.now(datetime.UTC):%Y-%m-%dT%H:%M:%SZ}")
            obj = DemuxObject(text_sha256(source, mode, migrate), mode, migrate,
                              compiled.insns, compiled.license, tuple(maps.values()),
                              tuple(relocs), text, built)
            obj.check()
            return obj
        finally:
            compiled.close()
    finally:
        os.close(placeholder)


@dataclass
class Loaded:
    prog_fd: int
    slots_fd: int


def instantiate(obj: DemuxObject, sockarray_fd: int, config: ProgramConfig) -> Loaded:
    """Create the object's maps, point its references at them, write the
    configuration, load. Needs bpf(2) and CAP_BPF, nothing else."""
    fds: dict[str, int] = {}
    try:
        for spec in obj.maps:
            fds[spec.name] = shim.map_create(spec.type, spec.key_size, spec.value_size,
                                             spec.max_entries, spec.flags, spec.name)
        if CONFIG in fds:
            shim.map_update(fds[CONFIG], struct.pack("<I", 0), config.pack())
        insns = bytearray(obj.insns)
        for index, name in obj.relocs:
            fd = sockarray_fd if name == SOCKARRAY else fds[name]
            struct.pack_into("<i", insns, index * 8 + 4, fd)
        prog_fd = shim.prog_load(shim.BPF_PROG_TYPE_SK_REUSEPORT, bytes(insns), obj.license,
                                 "zion_demux", shim.BPF_SK_REUSEPORT_SELECT_OR_MIGRATE
                                 if obj.migrate else 0)
        if SLOTS not in fds:
            os.close(prog_fd)
            raise ShimError(ShimOp.LOAD, None, "", f"the program uses no {SLOTS} map")
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    # The loaded program holds its own references to its maps; the master
    # keeps only the status board's (it maps it).
    slots_fd = fds.pop(SLOTS)
    for fd in fds.values():
        os.close(fd)
    return Loaded(prog_fd, slots_fd)


def build(dest: Path, modes: list[str], kernel_source: str | None) -> list[Path]:
    """Compile every variant into `dest` (scripts/setup.sh, image builds)."""
    from zion.demux import preflight
    from zion.demux.program import source_path

    bcc = preflight.import_bcc()
    source = source_path().read_text()
    written = []
    for mode in modes:
        for migrate in (True, False):
            obj = compile_object(bcc, source, mode, migrate, kernel_source)
            written.append(save(obj, [dest], file_name(source, mode, migrate, False)))
    return written


def main(argv: list[str]) -> int:
    """python -m zion.demux.objects [DIR]: compile the shipped program's
    variants into DIR (default: the package's _data/objects)."""
    from zion.demux import preflight
    from zion.demux.program import MODES
    from zion.demux.reasons import Unavailable
    from zion.settings import load_settings

    dest = Path(argv[0]) if argv else package_dir()
    try:
        settings = load_settings(None, {}, dict(os.environ))
        kernel_source, how = headers.find(settings.demux.kernel_headers,
                                          preflight.cache_dir(settings))
        for path in build(dest, list(MODES), kernel_source):
            print(f"zion: compiled {path} (headers: {how})")
    except (Unavailable, ShimError, OSError) as exc:
        print(f"zion: the demux object was not compiled: {exc}", file=sys.stderr)
        # bcc creates the program's maps while compiling, so a build where bpf()
        # is refused (a container build under its default seccomp profile) fails
        # with bcc's bare "Failed to compile BPF module": say why, and the fix
        from zion.demux.readiness import diagnose_bpf

        refused = diagnose_bpf()
        if refused is not None:
            print(f"zion: compiling needs bpf(), and here: {refused.state}: {refused.detail}\n"
                  f"zion: fix: {refused.fix}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main(sys.argv[1:]))
