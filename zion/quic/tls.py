"""The QUIC server configuration of a worker: the same certificate and key
as its TCP listener, ALPN h3, zion's fixed CID length, and receive windows
from the limits.

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

# Seconds without a packet after which a QUIC connection is gone (RFC 9000
# 10.1). Not keepalive_timeout: with no request in flight a session closes
# itself after keepalive_timeout (zion/http/h3.py), but while an app takes
# its time no packet flows, and the connection must outlive that.
IDLE_TIMEOUT = 60.0


def configuration(settings: Settings) -> QuicConfiguration:
    tls = settings.tls
    limits = settings.limits
    config = QuicConfiguration(
        is_client=False,
        alpn_protocols=H3_ALPN,
        connection_id_length=cid.CID_LENGTH,
        idle_timeout=IDLE_TIMEOUT,
        # The receive windows a client starts with; a stream's only slides
        # past what its app read (zion/quic/connection.py).
        max_stream_data=limits.h2_stream_window,
        max_data=limits.h2_connection_window,
    )
    certfile, keyfile, _source = cert_files(tls)
    try:
        config.load_cert_chain(certfile, keyfile or None,
                               password=tls.keyfile_password or None)
    except (OSError, ValueError) as exc:
        raise WorkerBootError(f"HTTP/3 cannot load {certfile} / {keyfile}: {exc}") from None
    return config
