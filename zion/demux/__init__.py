"""The SK_REUSEPORT demux, in parts.

shim.py: typed bpf(2) calls (maps, program load, attach) and bcc's compile,
no policy. program.py: the program text, its -D contract and its run-time
config (bpf/zion_demux.c is the source). objects.py: the compiled object
(bytecode + map references) kept with the installation and loaded without
headers or LLVM. compile_helper.py: bcc in a short-lived process.
preflight.py and headers.py: kernel, capabilities, bcc, headers. policy.py:
`DemuxState` and `FallbackReason`, setup / prepare / swap, the one fallback
log line, the one place compiler output becomes a reason. board.py: the
status slots shared with the program. sampler.py: the accept-queue sampler.
readiness.py: `zion doctor`'s trial load and capability diagnosis.
"""
