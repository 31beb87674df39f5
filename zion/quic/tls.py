"""The QUIC server configuration of a worker: the same certificate and key
as its TCP listener, ALPN h3, zion's fixed CID length, and the receive windows
and idle timeout of the limits (h3_*).

Built in the worker before it drops its privileges (the key file may be
readable by root only), from the same files zion/tls.py loads.
"""

from __future__ import annotations

from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration

from zion.errors import WorkerBootError
from zion.quic import cid
from zion.settings import Settings
from zion.tls import cert_files


def configuration(settings: Settings) -> QuicConfiguration:
    tls = settings.tls
    limits = settings.limits
    config = QuicConfiguration(
        is_client=False,
        alpn_protocols=H3_ALPN,
        connection_id_length=cid.CID_LENGTH,
        idle_timeout=limits.h3_idle_timeout,
        # The receive windows a client starts with; zion/quic/connection.py
        # slides them (by the same amounts) instead of aioquic's doubling.
        max_stream_data=limits.h3_stream_window,
        max_data=limits.h3_connection_window,
    )
    certfile, keyfile, _source = cert_files(tls)
    try:
        config.load_cert_chain(certfile, keyfile or None,
                               password=tls.keyfile_password or None)
    except (OSError, ValueError) as exc:
        raise WorkerBootError(f"HTTP/3 cannot load {certfile} / {keyfile}: {exc}") from None
    return config
