"""Typed errors. Exit codes are chosen only at the edges (cli, master)."""

from __future__ import annotations


class ZionError(Exception):
    """Base class; `exit_code` is what the CLI exits with if this escapes."""

    exit_code = 1


class ConfigError(ZionError):
    """A configuration value is missing, malformed or out of range."""

    exit_code = 2


class TLSConfigError(ZionError):
    """The certificate or key cannot be read, parsed or paired."""

    exit_code = 2


class BindError(ZionError):
    """A listening socket could not be created or bound."""

    exit_code = 1


class WorkerBootError(ZionError):
    """A worker can never start (the app does not import, lifespan failed)."""

    exit_code = 3


class DemuxError(ZionError):
    """The eBPF demux could not be loaded or attached. Never fatal."""

    def __init__(self, reason: str, detail: str, errno: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.errno = errno
