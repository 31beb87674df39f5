"""The master process, in parts that each own one concern.

master.py is the loop and the only part that acts; the others keep state and
return events or verdicts: signals.py (the queue signal handlers fill),
pool.py (worker processes), respawn.py (a pure policy), generation.py (what
one generation of workers runs on, and a reload's progress), retiring.py
(listeners leaving the group), notify.py (sd_notify), reloader.py (the
--reload file watcher: a thread that only raises a flag and wakes the loop).
"""
