"""The transaction and call tables are bounded (``sip.max_transactions``, ``sip.max_dialogs``),
over real sockets with a scripted core on 127.0.0.1: beyond a limit a new call hears 503 +
Retry-After and is counted, while the calls in progress still end with their BYE."""

from __future__ import annotations

import re

import pytest

from .harness import HOST, E2EStack, events_total, free_port
from .scripted import Caller, Core, header

pytestmark = pytest.mark.e2e

TABLE = 100  # the smallest max_transactions the config takes


def _guard(stack: E2EStack, core: Core, sip: str) -> tuple[int, int]:
    """sipguard on UDP in front of ``core`` with its metrics endpoint and the ``sip:``
    settings given: its SIP port and its metrics port."""
    metrics_port = free_port()
    _, port = stack.sipguard(core_port=core.port, listen=("udp",),
                             config_extra=f"metrics: {{listen: {HOST}:{metrics_port}}}\n{sip}")
    return port, metrics_port


def _call(caller: Caller, call_id: str, extra: str = "") -> tuple[str, str]:
    """Place a call the core answers (``extra``: more INVITE header lines); ACK it. Returns
    its To tag and Route line."""
    caller.send(caller.request("INVITE", call_id, extra=extra))
    [ok] = caller.finals(call_id=call_id)
    assert ok.startswith(b"SIP/2.0 200 "), ok
    to_tag = re.search(r"tag=([^;>\s]+)", header(ok, "To"))
    assert to_tag is not None
    route = f"Route: {header(ok, 'Record-Route')}\r\n"
    caller.send(caller.request("ACK", call_id, to_tag=to_tag.group(1), extra=route))
    return to_tag.group(1), route


def test_a_full_transaction_table_refuses_new_calls_and_lets_calls_in_progress_end(
    stack: E2EStack,
) -> None:
    """max_transactions 100, filled by one call and 99 OPTIONS (each answered transaction is
    held 32 s): a new INVITE and an out-of-dialog OPTIONS hear 503 + Retry-After, counted as
    dropped_limit_transactions, and reach no core; a BYE for no live call hears its 481 (it
    needs no transaction); the call's own BYE still reaches the core and its 200 comes back."""
    core = Core()
    port, metrics_port = _guard(stack, core, f"sip: {{max_transactions: {TABLE}}}\n")
    caller = Caller(port)
    try:
        to_tag, route = _call(caller, "up-1")
        for i in range(TABLE - 1):
            caller.send(caller.request("OPTIONS", f"fill-{i}"))
            assert caller.finals(call_id=f"fill-{i}"), f"OPTIONS {i} unanswered"
        for method, call_id, tag in (("INVITE", "new-1", ""), ("OPTIONS", "new-2", ""),
                                     ("BYE", "gone-1", "nobody")):
            caller.send(caller.request(method, call_id, to_tag=tag, cseq=2 if tag else 1))
            [busy] = caller.finals(call_id=call_id)
            if tag:
                assert busy.startswith(b"SIP/2.0 481 "), busy
            else:
                assert busy.startswith(b"SIP/2.0 503 "), busy
                assert header(busy, "Retry-After").isdigit(), busy
            assert core.methods(call_id) == [], f"{method} reached the core"
        caller.send(caller.request("BYE", "up-1", cseq=2, to_tag=to_tag, extra=route))
        [ok] = caller.finals(call_id="up-1")
        assert ok.startswith(b"SIP/2.0 200 ") and b"CSeq: 2 BYE" in ok, ok
        assert core.methods("up-1") == ["INVITE", "ACK", "BYE"]
        assert events_total(metrics_port).get("dropped_limit_transactions") == 2
    finally:
        caller.close()
        core.close()


def test_the_call_table_limit_refuses_a_new_call_and_the_call_up_ends(stack: E2EStack) -> None:
    """max_dialogs 1: with one call up a second INVITE hears 503 + Retry-After, counted as
    dropped_limit_dialogs; once the first call's BYE is answered a new call goes through."""
    core = Core()
    port, metrics_port = _guard(stack, core, "sip: {max_dialogs: 1}\n")
    caller = Caller(port)
    try:
        to_tag, route = _call(caller, "one-1")
        caller.send(caller.request("INVITE", "two-1"))
        [busy] = caller.finals(call_id="two-1")
        assert busy.startswith(b"SIP/2.0 503 ") and header(busy, "Retry-After").isdigit(), busy
        assert core.methods("two-1") == []
        assert events_total(metrics_port).get("dropped_limit_dialogs") == 1
        caller.send(caller.request("BYE", "one-1", cseq=2, to_tag=to_tag, extra=route))
        [ok] = caller.finals(call_id="one-1")
        assert ok.startswith(b"SIP/2.0 200 "), ok
        _call(caller, "three-1")
    finally:
        caller.close()
        core.close()


def test_made_up_dialogs_and_cancels_cannot_fill_the_transaction_table(stack: E2EStack) -> None:
    """max_transactions 100: 150 in-dialog requests for calls that do not exist and 150
    CANCELs for INVITEs that do not exist each hear one 481, counted as
    dropped_in_dialog_refused / dropped_cancel_unmatched, reach no core and keep no
    transaction — the next call still goes through, not 503."""
    core = Core()
    port, metrics_port = _guard(stack, core, f"sip: {{max_transactions: {TABLE}}}\n")
    caller = Caller(port)
    made_up = TABLE + TABLE // 2
    try:
        for i in range(made_up):
            for method, tag in (("MESSAGE", "made-up"), ("CANCEL", "")):
                call_id = f"{method.lower()}-{i}"
                caller.send(caller.request(method, call_id, to_tag=tag))
                [refused] = caller.finals(call_id=call_id)
                assert refused.startswith(b"SIP/2.0 481 "), refused
        assert core.methods() == []
        _call(caller, "real-1")
        counts = events_total(metrics_port)
        assert counts.get("dropped_in_dialog_refused") == made_up, counts
        assert counts.get("dropped_cancel_unmatched") == made_up, counts
        assert counts.get("dropped_limit_transactions") is None, counts
    finally:
        caller.close()
        core.close()


PAD = "".join(f"X-Pad-{i}: {'p' * 14000}\r\n" for i in range(4))  # ~56 KB, lines < 16 KB


def test_the_bytes_the_tables_hold_are_bounded_however_large_each_message(
    stack: E2EStack,
) -> None:
    """sip.max_transaction_bytes_mib 1: requests of ~56 KB (each line under the line limit)
    fill it after 18, whatever max_transactions says — the next hears 503 + Retry-After,
    counted dropped_limit_transaction_bytes, and reaches no core; ordinary requests were
    never near it. sip.max_dialog_bytes_mib 1 (another instance): calls whose INVITEs are that
    large fill it after 18; the next call hears 503 (dropped_limit_dialog_bytes); one call's
    INFOs that large pass its sip.max_call_request_kib (128) at the third, which hears 503
    (dropped_limit_call_bytes); once one call has ended, a new one goes through."""
    core = Core()
    port, metrics_port = _guard(stack, core, "sip: {max_transaction_bytes_mib: 1}\n")
    caller = Caller(port)
    try:
        statuses = []
        for i in range(20):
            caller.send(caller.request("OPTIONS", f"big-{i}", extra=PAD))
            [final] = caller.finals(call_id=f"big-{i}")
            statuses.append(int(final.split(b" ", 2)[1]))
        assert statuses == [200] * 18 + [503] * 2, statuses
        assert core.methods("big-19") == []
        assert events_total(metrics_port).get("dropped_limit_transaction_bytes") == 2
    finally:
        caller.close()
        core.close()
    core = Core()
    port, metrics_port = _guard(stack, core,
                                "sip: {max_dialog_bytes_mib: 1, max_call_request_kib: 128}\n")
    caller = Caller(port)
    try:
        calls = [_call(caller, f"call-{i}", PAD) for i in range(18)]
        caller.send(caller.request("INVITE", "call-18", extra=PAD))
        [busy] = caller.finals(call_id="call-18")
        assert busy.startswith(b"SIP/2.0 503 ") and core.methods("call-18") == [], busy[:40]
        to_tag, route = calls[0]
        statuses = []
        for cseq in (2, 3, 4):  # one call's INFOs: two fit its 128 KiB, the third does not
            caller.send(caller.request("INFO", "call-0", cseq=cseq, to_tag=to_tag,
                                       extra=route + PAD))
            [final] = caller.finals(call_id="call-0")
            statuses.append(int(final.split(b" ", 2)[1]))
        assert statuses == [200, 200, 503], statuses
        assert core.methods("call-0").count("INFO") == 2
        counts = events_total(metrics_port)
        assert counts.get("dropped_limit_dialog_bytes") == 1, counts
        assert counts.get("dropped_limit_call_bytes") == 1, counts
        caller.send(caller.request("BYE", "call-0", cseq=5, to_tag=to_tag, extra=route))
        [ok] = caller.finals(call_id="call-0")
        assert ok.startswith(b"SIP/2.0 200 "), ok[:40]
        _call(caller, "call-19", PAD)
    finally:
        caller.close()
        core.close()
