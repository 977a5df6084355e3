"""Pure outcome logic: replies -> attempt status, attempt status -> the delivery's next step."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailtrio import retry
from mailtrio.providers.base import AttemptStatus, Phase, RecipientReply, Reply

A = AttemptStatus


@pytest.mark.parametrize(
    ("code", "phase", "expected"),
    [
        (250, Phase.MESSAGE, A.PROVIDER_ACCEPTED),
        (451, Phase.RCPT, A.PROVIDER_DEFERRED),
        (452, Phase.MAIL, A.PROVIDER_DEFERRED),
        (421, Phase.DATA, A.PROVIDER_DEFERRED),
        (552, Phase.RCPT, A.PROVIDER_DEFERRED),  # RFC 5321: 552 on RCPT is temporary
        (552, Phase.MESSAGE, A.PROVIDER_REJECTED),  # ... but not after the message
        (550, Phase.RCPT, A.PROVIDER_REJECTED),
        (554, Phase.MESSAGE, A.PROVIDER_REJECTED),
        (600, Phase.MAIL, A.TRANSPORT_FAILED),  # not an SMTP reply class: protocol error
        (199, Phase.MAIL, A.TRANSPORT_FAILED),
    ],
)
def test_classify_reply(code: int, phase: Phase, expected: AttemptStatus) -> None:
    assert retry.classify_reply(Reply(code, "text"), phase) == expected


def test_refusal_with_a_success_code_is_a_protocol_error() -> None:
    refusal = retry.classify_refusal(Reply(250, "ok"), Phase.DATA)
    assert refusal.status == A.TRANSPORT_FAILED


@pytest.mark.parametrize("text", ["Recipient suppressed", "SUPPRESSION list", "address is suppressed by policy"])
def test_suppression_text_marks_a_rejection(text: str) -> None:
    refusal = retry.classify_refusal(Reply(550, text, "5.7.1"), Phase.MESSAGE)
    assert refusal.status == A.PROVIDER_REJECTED and refusal.suppressed


def test_suppression_text_on_a_temporary_reply_is_not_suppression() -> None:
    refusal = retry.classify_refusal(Reply(451, "suppressed for now"), Phase.MESSAGE)
    assert refusal.status == A.PROVIDER_DEFERRED and not refusal.suppressed


def _rcpts(*replies: tuple[int, str]) -> list[RecipientReply]:
    return [RecipientReply(f"r{i}@example.com", Reply(c, t)) for i, (c, t) in enumerate(replies)]


def test_recipients_any_accepted_goes_on_to_data() -> None:
    assert retry.classify_recipients(_rcpts((550, "unknown"), (250, "ok"))) is None
    assert retry.classify_recipients(_rcpts((251, "will forward"))) is None


def test_recipients_all_refused_any_temporary_is_deferred() -> None:
    refusal = retry.classify_recipients(_rcpts((550, "unknown"), (451, "later"), (552, "too many")))
    assert refusal is not None and refusal.status == A.PROVIDER_DEFERRED
    assert refusal.reply.code == 451


def test_recipients_all_permanent() -> None:
    refusal = retry.classify_recipients(_rcpts((550, "user unknown"), (550, "suppressed")))
    assert refusal is not None and refusal.status == A.PROVIDER_REJECTED and not refusal.suppressed
    assert refusal.reply.text == "user unknown"
    refusal = retry.classify_recipients(_rcpts((550, "suppressed"), (553, "Suppressed address")))
    assert refusal is not None and refusal.suppressed


def test_next_step_terminal_outcomes() -> None:
    ladder = (60.0, 300.0)
    assert retry.next_step(A.PROVIDER_ACCEPTED, suppressed=False, ladder_step=1, ladder=ladder) == retry.Step(
        "sent", None, 1
    )
    assert retry.next_step(A.SUPPRESSED, suppressed=True, ladder_step=0, ladder=ladder).delivery_status == "suppressed"
    assert retry.next_step(A.PROVIDER_REJECTED, suppressed=True, ladder_step=0, ladder=ladder).delivery_status == (
        "suppressed"
    )
    assert retry.next_step(A.PROVIDER_REJECTED, suppressed=False, ladder_step=0, ladder=ladder).delivery_status == (
        "failed"
    )
    with pytest.raises(ValueError):
        retry.next_step(A.INTERRUPTED, suppressed=False, ladder_step=0, ladder=ladder)


@given(
    ladder=st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), max_size=8),
    status=st.sampled_from(sorted(retry.RETRYABLE)),
)
def test_ladder_walk(ladder: list[float], status: AttemptStatus) -> None:
    """Retryable failures walk the ladder step by step, then dead-letter: len(ladder) + 1 attempts."""
    step = 0
    delays = []
    for _ in range(len(ladder)):
        nxt = retry.next_step(status, suppressed=False, ladder_step=step, ladder=ladder)
        assert nxt.delivery_status == "rendered" and not nxt.dead_letter
        assert nxt.ladder_step == step + 1
        delays.append(nxt.retry_delay)
        step = nxt.ladder_step
    assert delays == ladder
    last = retry.next_step(status, suppressed=False, ladder_step=step, ladder=ladder)
    assert last.delivery_status == "dead_letter" and last.dead_letter and last.retry_delay is None


def test_dead_letter_reason() -> None:
    assert retry.dead_letter_reason(3, "451 4.3.0 later") == "retry ladder exhausted after 3 attempts: 451 4.3.0 later"
    assert retry.dead_letter_reason(1, "x").startswith("retry ladder exhausted after 1 attempt:")


def test_reply_parse_and_summary() -> None:
    reply = Reply.parse(550, "5.1.1   User   unknown")
    assert (reply.code, reply.enhanced, reply.text) == (550, "5.1.1", "User unknown")
    assert reply.summary() == "550 5.1.1 User unknown"
    assert Reply.parse(250, "Ok").summary() == "250 Ok"
    assert Reply.parse(421, "").summary() == "421"
    assert Reply.parse(550, "5.7.1 bad\x00 byte\r\n and\ttab").text == "bad byte and tab"
