"""A worker that never becomes ready: its import never returns."""

import threading

threading.Event().wait()
