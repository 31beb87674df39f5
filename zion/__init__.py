"""zion: an asyncio HTTPS server whose workers are fed by an eBPF reuseport demux."""

__version__ = "0.1.0"
