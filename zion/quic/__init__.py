"""HTTP/3's kernel side: server connection IDs that name their worker
(cid.py), the UDP reuseport group (sockets.py) and the SK_REUSEPORT program
that steers each datagram by its destination connection ID (steering.py,
bpf/zion_quic.c)."""
