"""Pure outcome logic: replies -> attempt status, attempt status -> the delivery's next step."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailtrio import retry
from mailtrio.providers.base import AttemptStatus, Phase, RecipientReply, Reply, SendReport

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


# -- per-recipient outcomes ---------------------------------------------------------------------

LADDER = (60.0, 300.0)


def _report(status: AttemptStatus, summary: str, *rcpts: tuple[str, int, str],
            final: Reply | None = None, suppressed: bool = False) -> SendReport:
    return SendReport(status, summary, Phase.MESSAGE if rcpts else Phase.MAIL, reply=final,
                      recipients=tuple(RecipientReply(a, Reply(c, t)) for a, c, t in rcpts), suppressed=suppressed)


def _settle(report: SendReport, recipients: list[str], prior: dict[str, retry.RecipientOutcome] | None = None,
            ladder_step: int = 0, attempt_no: int = 1) -> retry.Settlement:
    prior = prior or {}
    return retry.settle(report, recipients=recipients, targets=retry.pending_recipients(recipients, prior),
                        prior=prior, attempt_no=attempt_no, ladder_step=ladder_step, ladder=LADDER)


def test_one_recipient_accepted_stores_nothing() -> None:
    s = _settle(_report(A.PROVIDER_ACCEPTED, "250 ok", ("a@x.example", 250, "ok"), final=Reply(250, "ok")),
                ["a@x.example"])
    assert s.step.delivery_status == "sent" and s.outcomes is None and s.status_reason is None


def test_accepted_and_deferred_retries_the_deferred_one_only() -> None:
    report = _report(A.PROVIDER_ACCEPTED, "250 2.0.0 queued (1 of 2 recipients accepted)",
                     ("a@x.example", 250, "ok"), ("b@x.example", 450, "4.2.1 busy"),
                     final=Reply(250, "queued", "2.0.0"))
    s = _settle(report, ["a@x.example", "b@x.example"])
    assert s.step.delivery_status == "rendered" and s.step.retry_delay == 60.0 and s.step.ladder_step == 1
    assert s.outcomes is not None
    assert [(o.email, o.status, o.reply) for o in s.outcomes] == [
        ("a@x.example", "accepted", "250 2.0.0 queued"), ("b@x.example", "deferred", "450 4.2.1 busy")]
    assert s.status_reason == "1 of 2 recipients accepted; deferred: b@x.example (450 4.2.1 busy)"
    prior = retry.outcomes_by_email([o.as_json() for o in s.outcomes])
    # the retry goes to b alone; once accepted the delivery is sent, a untouched
    assert retry.pending_recipients(["a@x.example", "b@x.example"], prior) == ["b@x.example"]
    second = _settle(_report(A.PROVIDER_ACCEPTED, "250 ok", ("b@x.example", 250, "ok"), final=Reply(250, "ok")),
                     ["a@x.example", "b@x.example"], prior, ladder_step=1, attempt_no=2)
    assert second.step.delivery_status == "sent" and second.status_reason is None
    assert second.outcomes is not None
    assert [(o.status, o.attempt_no) for o in second.outcomes] == [("accepted", 1), ("accepted", 2)]


def test_accepted_and_refused_is_sent_naming_the_refused_one() -> None:
    report = _report(A.PROVIDER_ACCEPTED, "250 ok (1 of 2 recipients accepted)",
                     ("a@x.example", 250, "ok"), ("b@x.example", 550, "5.1.1 No such user"), final=Reply(250, "ok"))
    s = _settle(report, ["a@x.example", "b@x.example"])
    assert s.step.delivery_status == "sent"
    assert s.status_reason == "1 of 2 recipients accepted; refused: b@x.example (550 5.1.1 No such user)"


def test_all_refused_is_failed_or_suppressed() -> None:
    report = _report(A.PROVIDER_REJECTED, "550 nope", ("a@x.example", 550, "nope"), ("b@x.example", 550, "nope"))
    s = _settle(report, ["a@x.example", "b@x.example"])
    assert s.step.delivery_status == "failed" and s.status_reason == "550 nope"
    report = _report(A.PROVIDER_REJECTED, "550 suppressed", ("a@x.example", 550, "suppressed"),
                     ("b@x.example", 550, "5.7.1 suppressed too"), suppressed=True)
    assert _settle(report, ["a@x.example", "b@x.example"]).step.delivery_status == "suppressed"


def test_the_ladder_running_out_dead_letters_the_still_deferred() -> None:
    prior = retry.outcomes_by_email([
        {"email": "a@x.example", "status": "accepted", "reply": "250 ok", "attempt_no": 1},
        {"email": "b@x.example", "status": "deferred", "reply": "450 busy", "attempt_no": 1}])
    s = _settle(_report(A.PROVIDER_DEFERRED, "450 busy", ("b@x.example", 450, "busy")),
                ["a@x.example", "b@x.example"], prior, ladder_step=len(LADDER), attempt_no=3)
    assert s.step.delivery_status == "dead_letter" and s.step.dead_letter
    assert s.outcomes is not None and [o.status for o in s.outcomes] == ["accepted", "dead_letter"]
    assert s.dead_reason == ("retry ladder exhausted after 3 attempts: 1 of 2 recipients accepted; "
                             "not delivered: b@x.example (450 busy)")


def test_a_transport_failure_defers_every_pending_recipient_with_the_same_reason() -> None:
    s = _settle(_report(A.TRANSPORT_FAILED, "transport failure during connect: refused"),
                ["a@x.example", "b@x.example"])
    assert s.step.delivery_status == "rendered"
    assert s.status_reason == "transport failure during connect: refused"
    assert s.outcomes is not None and {o.status for o in s.outcomes} == {"deferred"}


def test_one_recipient_failures_keep_the_reply_as_reason_and_store_nothing() -> None:
    s = _settle(_report(A.PROVIDER_DEFERRED, "451 later", ("a@x.example", 451, "later")), ["a@x.example"],
                ladder_step=len(LADDER), attempt_no=3)
    assert s.step.delivery_status == "dead_letter" and s.status_reason == "451 later"
    assert s.dead_reason == "retry ladder exhausted after 3 attempts: 451 later" and s.outcomes is None
    s = _settle(_report(A.PROVIDER_REJECTED, "550 suppressed", ("a@x.example", 550, "suppressed"),
                        suppressed=True), ["a@x.example"])
    assert s.step.delivery_status == "suppressed" and s.status_reason == "550 suppressed" and s.outcomes is None


@given(st.sampled_from(list(A)).filter(lambda a: a != A.INTERRUPTED), st.booleans(), st.integers(0, 3))
def test_one_recipient_settles_as_the_ladder_step_always_did(status: AttemptStatus, suppressed: bool,
                                                            step: int) -> None:
    suppressed = suppressed and status == A.PROVIDER_REJECTED
    s = _settle(_report(status, "summary", suppressed=suppressed), ["a@x.example"], ladder_step=step)
    assert s.step == retry.next_step(status, suppressed=suppressed, ladder_step=step, ladder=LADDER)
    assert s.status_reason == (None if status == A.PROVIDER_ACCEPTED else "summary")


_rcpt_code = st.sampled_from([250, 251, 450, 451, 452, 550, 552, 553])


@given(st.lists(st.tuples(_rcpt_code, _rcpt_code, st.booleans()), min_size=2, max_size=6))
def test_no_accepted_recipient_is_ever_a_target_again(plan: list[tuple[int, int, bool]]) -> None:
    """Over two attempts with any replies: a recipient accepted in the first is not sent the
    message in the second, and the delivery is final only when every recipient is."""
    emails = [f"r{i}@x.example" for i in range(len(plan))]
    first = _report(A.PROVIDER_ACCEPTED, "250 ok", *[(e, c, "t") for e, (c, _, _) in zip(emails, plan, strict=True)],
                    final=Reply(250, "ok"))
    if not any(c in (250, 251) for c, _, _ in plan):
        first = _report(A.PROVIDER_DEFERRED, "4xx", *[(e, c, "t") for e, (c, _, _) in zip(emails, plan, strict=True)])
    s1 = _settle(first, emails)
    prior = retry.outcomes_by_email([o.as_json() for o in s1.outcomes or ()])
    accepted = {o.email for o in s1.outcomes or () if o.status == "accepted"}
    targets = retry.pending_recipients(emails, prior)
    if s1.step.delivery_status == "rendered":
        assert targets and not accepted & set(targets)
    final = {o.status for o in s1.outcomes or ()} <= {"accepted", "rejected", "suppressed"}
    assert (s1.step.delivery_status != "rendered") == final
