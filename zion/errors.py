"""Typed errors, and the exit codes they become at the edges (cli, master,
a worker's os._exit). Every exit code zion uses is declared here, once."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # a runtime failure: cannot bind, a worker crashed
    CONFIG = 2  # bad configuration, certificate or key; usage errors
    WORKER_BOOT = 3  # a worker can never start: the master must not respawn it forever
    RECYCLED = 4  # a worker that served --limit-max-requests: replace it at once
    INTERRUPTED = 130  # Ctrl-C before the master took over signals


class ZionError(Exception):
    """Base class; `exit_code` is what the CLI exits with if this escapes."""

    exit_code = ExitCode.FAILURE


class ConfigError(ZionError):
    """A configuration value is missing, malformed or out of range."""

    exit_code = ExitCode.CONFIG


class TLSConfigError(ZionError):
    """The certificate or key cannot be read, parsed or paired."""

    exit_code = ExitCode.CONFIG


class BindError(ZionError):
    """A listening socket could not be created or bound."""

    exit_code = ExitCode.FAILURE


class WorkerBootError(ZionError):
    """A worker can never start (the app does not import, lifespan failed)."""

    exit_code = ExitCode.WORKER_BOOT
