"""consumers_app/lane_gate.py: one lane takes batches at a time, another only beside a slow one."""

import asyncio

from consumers_app.lane_gate import LaneGate

# Long enough that nothing in these tests turns slow unless it is meant to.
NEVER_SLOW = 60.0
# How long a lane that must not get a turn is watched (a bound, not a synchronisation).
WATCH_SECONDS = 0.3
DEADLINE = 5.0


async def not_given_a_turn(waiter: asyncio.Task) -> bool:
    done, _ = await asyncio.wait({waiter}, timeout=WATCH_SECONDS)
    return not done


async def test_the_first_lane_gets_a_turn_at_once():
    gate = LaneGate(NEVER_SLOW)
    turn = await asyncio.wait_for(gate.take_turn(), DEADLINE)
    gate.started(turn)
    assert gate.running == 1


async def test_a_second_lane_waits_while_a_batch_runs_and_goes_when_it_ends():
    gate = LaneGate(NEVER_SLOW)
    first = await gate.take_turn()
    gate.started(first)
    second = asyncio.create_task(gate.take_turn())
    assert await not_given_a_turn(second)

    gate.done(first)
    turn = await asyncio.wait_for(second, DEADLINE)
    assert turn != first


async def test_a_lane_waiting_for_frames_keeps_the_others_waiting():
    """A turn taken but not started (its lane waits for the queue) is never slow: one lane at a
    time waits for frames, so the next frames make one batch, not one each."""
    gate = LaneGate(0.01)
    first = await gate.take_turn()
    second = asyncio.create_task(gate.take_turn())
    assert await not_given_a_turn(second)
    gate.done(first)
    await asyncio.wait_for(second, DEADLINE)


async def test_a_slow_batch_lets_another_lane_start_beside_it():
    slow_after = 0.2
    gate = LaneGate(slow_after)
    loop = asyncio.get_running_loop()
    first = await gate.take_turn()
    gate.started(first)
    started = loop.time()

    second = await asyncio.wait_for(gate.take_turn(), DEADLINE)
    assert loop.time() - started >= slow_after
    gate.started(second)
    assert gate.running == 2

    # Two batches run, the second young: a third lane waits for it to turn slow too.
    await asyncio.wait_for(gate.take_turn(), DEADLINE)
    assert loop.time() - started >= 2 * slow_after - 0.01
