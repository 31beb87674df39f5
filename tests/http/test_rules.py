"""The refusals a request head gets before its app runs, taken alike by
HTTP/2 and HTTP/3 (zion/http/rules.py head_refusal)."""

from __future__ import annotations

from tests.support.fake_transport import make_state
from zion.http import rules


async def test_a_head_is_refused_for_load_then_length_then_target() -> None:
    state = make_state(limits={"max_body_size": 100})
    refuse = rules.head_refusal
    assert refuse(state, True, b"x", b"x", b"GET").status == 503  # type: ignore[union-attr]
    assert refuse(state, False, b"x", b"x", b"GET").status == 400  # type: ignore[union-attr]
    assert refuse(state, False, b"-1", b"/", b"POST").status == 400  # type: ignore[union-attr]
    assert refuse(state, False, b"101", b"x", b"POST").status == 413  # type: ignore[union-attr]
    assert refuse(state, False, b"100", b"x", b"POST") == rules.Refusal(
        400, "invalid request target")
    assert refuse(state, False, b"100", b"/a", b"POST") is None
    assert refuse(state, False, None, b"*", b"OPTIONS") is None
    assert refuse(state, False, None, b"*", b"GET") is not None
    # CONNECT's target is not origin-form: each protocol answers it itself.
    assert refuse(state, False, None, b"", b"CONNECT") is None
    assert refuse(state, False, None, b"example.com:443", b"CONNECT") is None


async def test_http2s_hot_path_may_skip_the_call() -> None:
    """h2.py does not call head_refusal for a head on a connection that is
    not overloaded, without content-length, with an origin-form target: it
    must be None for every such head (a rule refusing one belongs in that
    test in h2.py too)."""
    state = make_state(limits={"max_body_size": 1})
    for method in (b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"CONNECT", b"BREW"):
        for target in (b"/", b"/a?b=c", b"//x", b"/%00"):
            assert rules.head_refusal(state, False, None, target, method) is None
