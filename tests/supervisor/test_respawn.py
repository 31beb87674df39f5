"""The respawn policy without processes: backoff, reset on ready, give-up."""

from __future__ import annotations

from zion.errors import ExitCode
from zion.settings import SupervisorSettings
from zion.supervisor.respawn import GiveUp, Respawn, RespawnPolicy

SETTINGS = SupervisorSettings(drain_timeout=1, boot_timeout=5, respawn_backoff=0.1,
                              respawn_backoff_max=0.35, crash_loop_limit=4)


def test_backoff_doubles_per_failure_before_ready_and_is_capped():
    policy = RespawnPolicy(SETTINGS, 2)
    delays = [policy.on_death(0, False, 1, 100.0) for _ in range(3)]
    assert [v.delay for v in delays if isinstance(v, Respawn)] == [0.1, 0.2, 0.35]


def test_crash_loop_limit_gives_up_and_ready_resets_the_count():
    policy = RespawnPolicy(SETTINGS, 2)
    for _ in range(3):
        assert isinstance(policy.on_death(1, False, -9, 0.0), Respawn)
    verdict = policy.on_death(1, False, -9, 0.0)
    assert isinstance(verdict, GiveUp) and "4 times in a row" in verdict.reason
    assert "signal SIGKILL" in verdict.reason
    fresh = RespawnPolicy(SETTINGS, 2)
    for _ in range(3):
        fresh.on_death(1, False, 1, 0.0)
    fresh.on_ready(1)
    assert isinstance(fresh.on_death(1, False, 1, 0.0), Respawn)


def test_a_worker_that_can_never_start_is_not_respawned():
    verdict = RespawnPolicy(SETTINGS, 1).on_death(0, False, ExitCode.WORKER_BOOT, 0.0)
    assert isinstance(verdict, GiveUp) and "cannot start" in verdict.reason


def test_a_ready_worker_that_dies_is_respawned_after_the_base_backoff():
    policy = RespawnPolicy(SETTINGS, 1)
    for _ in range(10):  # deaths after becoming ready never count as a crash loop
        verdict = policy.on_death(0, True, -9, 50.0)
        assert isinstance(verdict, Respawn) and verdict.delay == 0.1


def test_due_slots_are_taken_once_at_their_time():
    policy = RespawnPolicy(SETTINGS, 3)
    policy.on_death(0, True, 1, 10.0)
    policy.on_death(2, False, 1, 10.0)
    assert policy.next_due() == 10.1
    assert policy.take_due(10.05) == []
    assert policy.take_due(10.1) == [0, 2]
    assert policy.take_due(11.0) == [] and policy.next_due() is None


def test_a_recycled_worker_is_replaced_at_once_and_never_counts_as_a_failure():
    policy = RespawnPolicy(SETTINGS, 1)
    for _ in range(10):
        verdict = policy.on_death(0, True, ExitCode.RECYCLED, 7.0)
        assert isinstance(verdict, Respawn) and verdict.delay == 0.0
        assert policy.take_due(7.0) == [0]
