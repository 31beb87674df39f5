"""The suite's own machinery (tests/conftest.py): each test collects its own
garbage, so a leaked socket fails the test that leaked it, not a later one."""

from __future__ import annotations

import pytest

from tests.conftest import REPO

pytest_plugins = ["pytester"]


def test_a_socket_left_in_a_cycle_fails_the_test_that_left_it(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\nfilterwarnings = ["error"]\n'
                                'asyncio_default_fixture_loop_scope = "function"\n')
    pytester.makeconftest("from tests.conftest import (_collect_garbage, _collect_module_garbage,"
                          " _collect_session_garbage)\n")
    pytester.makepyfile(test_leak="""
        import gc
        import socket


        def test_leaks() -> None:
            gc.disable()  # no collection before the fixture's, wherever thresholds stand
            holder = {"sock": socket.socket()}
            holder["self"] = holder  # a cycle: only the collector frees it


        def test_later() -> None:
            gc.enable()
        """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaks*",
                                 "*ResourceWarning: unclosed <socket.socket*"])
    result.assert_outcomes(passed=2, errors=1)


def test_a_slow_stop_fails_the_test_unless_it_is_a_known_one(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    # STOP_SLOW at 0: every stop is slow, so the check shows in a second, not in
    # a zion made to stop slowly.
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\nmarkers = ["slow_stop"]\n'
                               'asyncio_default_fixture_loop_scope = "function"\n')
    pytester.makeconftest("from tests import conftest\n"
                          "from tests.conftest import start_zion, state_dir, zion_env\n"
                          "conftest.STOP_SLOW = 0.0\n")
    pytester.makepyfile(test_stop="""
        import pytest


        def test_left_running(start_zion) -> None:
            start_zion("raw_app:app", "--no-bpf-demux", workers=1)


        @pytest.mark.slow_stop("known")
        def test_known(start_zion) -> None:
            start_zion("raw_app:app", "--no-bpf-demux", workers=1)


        def test_stopped_by_the_test(start_zion) -> None:
            assert start_zion("raw_app:app", "--no-bpf-demux", workers=1).stop() == 0


        def test_stopped_by_the_test_known(start_zion) -> None:
            srv = start_zion("raw_app:app", "--no-bpf-demux", workers=1)
            assert srv.stop(slow="known") == 0
        """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_left_running*",
                                 "*a slow stop at the test's end:*",
                                 "*zion (pid *) took * s to stop after SIGTERM:*"])
    result.stdout.fnmatch_lines(["*_ test_stopped_by_the_test _*",
                                 "*zion (pid *) took * s to stop after SIGTERM:*"])
    result.assert_outcomes(passed=3, failed=1, errors=1)
