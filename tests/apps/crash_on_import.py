"""A worker that dies on import with an ordinary exit code (not "can never
start"): the master respawns it until crash_loop_limit."""

import os

os._exit(7)
