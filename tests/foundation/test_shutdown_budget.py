"""The one deadline's arithmetic (mailtrio.shutdown), in-process on Trio's clock."""

from __future__ import annotations

import math

import pytest
import trio

from mailtrio import shutdown


async def test_a_clean_up_step_started_before_the_signal_is_cut_to_the_deadline_minus_its_reserve() -> None:
    stop = shutdown.Shutdown(6.0)
    with stop.shielded(15.0) as scope:  # e.g. an outcome write in flight, WRITE_TIMEOUT 15 s
        assert scope.deadline == pytest.approx(trio.current_time() + 15.0, abs=0.1)
        stop.request()
        assert scope.deadline == stop.deadline - shutdown.close_reserve(6.0)
        assert stop.deadline <= trio.current_time() + 6.0


async def test_a_step_started_after_the_signal_never_reaches_past_the_deadline() -> None:
    stop = shutdown.Shutdown(6.0)
    stop.request()
    with stop.shielded(60.0, reserve=0.0) as scope:
        assert scope.deadline == stop.deadline
    with stop.shielded(0.5) as short:
        assert short.deadline <= trio.current_time() + 0.5


async def test_the_deadline_is_infinite_until_a_request() -> None:
    stop = shutdown.Shutdown(6.0)
    assert stop.deadline == math.inf
    with stop.shielded(2.0) as scope:
        assert scope.deadline == pytest.approx(trio.current_time() + 2.0, abs=0.1)


async def test_a_second_request_cancels_every_step_at_once() -> None:
    stop = shutdown.Shutdown(30.0)
    hurried: list[bool] = []
    stop.on_hurry(lambda: hurried.append(True))
    stop.request()
    started = trio.current_time()
    async with trio.open_nursery() as nursery:

        async def clean_up() -> None:
            with stop.shielded(20.0):
                await trio.sleep(20.0)

        nursery.start_soon(clean_up)
        await trio.sleep(0.1)
        stop.request()  # the second signal
    assert trio.current_time() - started < 1.0
    assert stop.hurried and hurried == [True]
    with stop.shielded(5.0) as late:
        await trio.sleep(5.0)
    assert late.cancelled_caught  # steps started after the hurry are cancelled at once


async def test_a_shielded_step_ignores_an_outer_cancel_but_not_its_budget() -> None:
    stop = shutdown.Shutdown(6.0)
    with trio.CancelScope() as outer:
        outer.cancel()
        with stop.shielded(0.2) as scope:
            await trio.sleep(1.0)
    assert scope.cancelled_caught


def test_the_budget_layout() -> None:
    assert shutdown.drain_reserve(30.0) == 3.0 and shutdown.close_reserve(30.0) == 1.0
    assert shutdown.drain_reserve(6.0) == pytest.approx(1.2) and shutdown.close_reserve(6.0) == pytest.approx(0.6)
    assert shutdown.drain_reserve(6.0) > shutdown.close_reserve(6.0) > 0
