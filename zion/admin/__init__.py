"""The master's admin side: an HTTP listener for operators (/metrics,
/status, /ready) and an HAProxy agent-check responder, both served from the
master's select loop, both computed from the status board the demux reads."""
