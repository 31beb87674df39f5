"""The SK_REUSEPORT demux, in parts.

shim.py: typed `SkReuseport` and `ReuseportSockArray` over bcc/libbcc, no
policy. program.py: the program text and its -D contract (bpf/zion_demux.c
is the source). preflight.py and headers.py: kernel, capabilities, bcc,
headers. policy.py: `DemuxState` and `FallbackReason`, setup / prepare /
swap, the one fallback log line, the one place compiler output becomes a
reason. board.py: the status slots shared with the program. sampler.py: the
accept-queue sampler. readiness.py: `zion doctor`'s trial load.
"""
