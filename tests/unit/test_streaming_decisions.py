"""The streaming layer's decisions as plain objects: cursors, slots, credits, groups. No
threads, sockets or sleeps."""

from __future__ import annotations

import numpy as np
import pytest

from augserve.core.errors import SpecError
from augserve.streaming import groups
from augserve.streaming.credits import MAX_OUTSTANDING_CREDITS, CreditWindow
from augserve.streaming.cursor import EpochLayout, shard_samples
from augserve.streaming.slots import ProducedBatch, SlotTable


class TestCursor:
    def test_shards_split_round_robin(self) -> None:
        assert [shard_samples(10, index, 3) for index in range(3)] == [4, 3, 3]
        assert shard_samples(2, 2, 3) == 0

    def test_batches_per_epoch(self) -> None:
        assert EpochLayout(10, 4, drop_last=False).batches_per_epoch == 3
        assert EpochLayout(10, 4, drop_last=True).batches_per_epoch == 2
        assert EpochLayout(8, 4, drop_last=True).batches_per_epoch == 2

    def test_next_cursor_walks_every_batch_then_the_next_epoch(self) -> None:
        layout = EpochLayout(10, 4, drop_last=False)
        cursor, seen = (0, 0), []
        while cursor[0] == 0:
            seen.append(cursor)
            cursor = layout.next_cursor(cursor)
        assert seen == [(0, 0), (0, 4), (0, 8)] and cursor == (1, 0)

    def test_drop_last_skips_the_short_batch(self) -> None:
        layout = EpochLayout(10, 4, drop_last=True)
        assert layout.next_cursor((3, 0)) == (3, 4)
        assert layout.next_cursor((3, 4)) == (4, 0)


def batch(sequence: int, slot: int, position: int = 0) -> ProducedBatch:
    ids = np.arange(2, dtype=np.int64)
    return ProducedBatch(sequence, 0, position, slot, ids, ids, [], (0, position + 2), False, 0, produced_at=0.0)


class TestSlotTable:
    def test_free_slots_first_then_the_oldest_unreferenced(self) -> None:
        table = SlotTable(2)
        first, second = table.take_slot(), table.take_slot()
        table.add(batch(0, first))
        table.add(batch(1, second, position=2))
        table.reference(0)
        assert table.has_slot()  # batch 1 is unreferenced
        assert table.take_slot() == second and table.get(1) is None
        assert not table.has_slot()  # only referenced batch 0 is left
        table.release(0)
        assert table.has_slot() and table.take_slot() == first

    def test_released_batches_stay_readable_until_reused(self) -> None:
        table = SlotTable(3)
        table.add(batch(0, table.take_slot()))
        table.reference(0)
        table.release(0)
        table.release(0)  # a second release is harmless
        assert table.get(0).references == 0 and table.sequence_at((0, 0)) == 0

    def test_give_back_returns_an_unused_slot(self) -> None:
        table = SlotTable(1)
        slot = table.take_slot()
        assert not table.has_slot()
        table.give_back(slot)
        assert table.has_slot()


class TestCreditWindow:
    def test_credits_are_honoured_not_capped(self) -> None:
        window = CreditWindow(granted=4)
        window.grant(1000)
        sent = 0
        while window.may_send:
            window.use()
            sent += 1
        assert sent == 1004 and window.available == 0

    def test_a_credit_flood_is_refused_with_the_field(self) -> None:
        window = CreditWindow(granted=0)
        with pytest.raises(SpecError) as caught:
            window.grant(MAX_OUTSTANDING_CREDITS + 1)
        assert caught.value.field == "credit.batches"

    def test_no_send_without_credit(self) -> None:
        window = CreditWindow(granted=1)
        window.use()
        assert not window.may_send
        with pytest.raises(RuntimeError):
            window.use()


def may_produce(**changes: object) -> bool:
    arguments = dict(
        members=2, expected_members=2, produced=0, waited_seconds=0.0, group_wait_seconds=30.0,
        needed_until_epoch=None, cursor_epoch=0, has_slot=True,
    )
    arguments.update(changes)
    return groups.may_produce(**arguments)


class TestMayProduce:
    def test_a_new_group_gathers_its_members_until_the_wait_runs_out(self) -> None:
        assert not may_produce(members=1)
        assert may_produce(members=1, waited_seconds=31.0)
        assert may_produce(members=2)

    def test_members_leaving_later_do_not_stop_the_others(self) -> None:
        assert may_produce(members=1, produced=5)

    def test_no_members_no_slot_or_no_epoch_needed(self) -> None:
        assert not may_produce(members=0, produced=5)
        assert not may_produce(has_slot=False)
        assert not may_produce(needed_until_epoch=2, cursor_epoch=2)
        assert may_produce(needed_until_epoch=2, cursor_epoch=1)

    def test_needed_until_is_the_last_members_end(self) -> None:
        assert groups.needed_until([1, 3, 2]) == 3
        assert groups.needed_until([1, None]) is None
        assert groups.needed_until([]) == 0


def member(session_id: str, behind: int = 0, holds_oldest: bool = True, policy: str = "lockstep", idle: float = 0.0):
    return groups.MemberView(session_id, behind, holds_oldest, policy, idle)


class TestStragglers:
    def test_a_stalled_member_is_detached(self) -> None:
        decisions = groups.stragglers(
            [member("a"), member("b", behind=3, idle=31.0)], blocked=True, window=8, stall_seconds=30.0
        )
        assert decisions == [groups.Detach("b", "stalled")]

    def test_a_detach_member_a_window_behind_goes_a_lockstep_one_waits(self) -> None:
        members = [member("a"), member("b", behind=8, policy="detach"), member("c", behind=8)]
        assert groups.stragglers(members, blocked=True, window=8, stall_seconds=30.0) == [
            groups.Detach("b", "fell behind its group")
        ]

    def test_only_members_holding_the_oldest_batch_block(self) -> None:
        members = [member("a", holds_oldest=False, idle=99.0), member("b", idle=1.0)]
        assert groups.stragglers(members, blocked=True, window=8, stall_seconds=30.0) == []

    def test_nothing_happens_unless_blocked_and_shared(self) -> None:
        stalled = [member("a", idle=99.0), member("b", idle=99.0)]
        assert groups.stragglers(stalled, blocked=False, window=8, stall_seconds=30.0) == []
        assert groups.stragglers(stalled[:1], blocked=True, window=8, stall_seconds=30.0) == []

    def test_the_member_furthest_ahead_always_stays(self) -> None:
        members = [member("a", behind=2, idle=50.0), member("b", behind=5, idle=40.0)]
        assert groups.stragglers(members, blocked=True, window=8, stall_seconds=30.0) == [groups.Detach("b", "stalled")]


class TestPausedMembers:
    def test_a_paused_member_is_not_detached_as_stalled(self) -> None:
        paused = groups.MemberView("b", 3, True, "lockstep", 99.0, paused=True)
        assert groups.stragglers([member("a"), paused], blocked=True, window=8, stall_seconds=30.0) == []

    def test_a_paused_detach_member_a_window_behind_still_goes(self) -> None:
        paused = groups.MemberView("b", 8, True, "detach", 99.0, paused=True)
        assert groups.stragglers([member("a"), paused], blocked=True, window=8, stall_seconds=30.0) == [
            groups.Detach("b", "fell behind its group")
        ]


class TestOrderGathering:
    def test_a_new_producer_waits_for_the_sessions_announced_on_its_order(self) -> None:
        assert not may_produce(members=1, expected_members=1, order_sessions=2, expected_order_sessions=4)
        assert may_produce(members=1, expected_members=1, order_sessions=4, expected_order_sessions=4)
        assert may_produce(members=1, expected_members=1, order_sessions=2, expected_order_sessions=4, waited_seconds=31.0)
        assert may_produce(members=1, expected_members=1, order_sessions=2, expected_order_sessions=4, produced=3)


class TestCeiling:
    def test_a_detached_members_producer_stops_where_its_group_still_holds_batches(self) -> None:
        assert groups.below_ceiling((0, 8), None)
        assert groups.below_ceiling((0, 8), (0, 16))
        assert not groups.below_ceiling((0, 16), (0, 16))
        assert not groups.below_ceiling((1, 0), (0, 16))
        assert not may_produce(below_ceiling=False)


def detached(session_id: str = "s", sequence: int | None = 5, group_next: int = 7, policy: str = "lockstep", alive: bool = True):
    return groups.DetachedView(session_id, policy, alive, sequence, group_next)


class TestRejoins:
    def test_a_member_whose_next_batch_the_group_holds_rejoins_there(self) -> None:
        assert groups.rejoins([detached()], window=8) == [groups.Rejoin("s", 5)]
        assert groups.rejoins([detached(sequence=7)], window=8) == [groups.Rejoin("s", 7)]  # the group's next

    def test_not_while_the_group_no_longer_holds_it_or_is_gone(self) -> None:
        assert groups.rejoins([detached(sequence=None)], window=8) == []
        assert groups.rejoins([detached(alive=False)], window=8) == []

    def test_a_detach_member_that_would_be_a_window_behind_waits(self) -> None:
        assert groups.rejoins([detached(sequence=0, group_next=8, policy="detach")], window=8) == []
        assert groups.rejoins([detached(sequence=1, group_next=8, policy="detach")], window=8) == [groups.Rejoin("s", 1)]
        assert groups.rejoins([detached(sequence=0, group_next=8)], window=8) == [groups.Rejoin("s", 0)]


class TestDecodeTakers:
    def test_producers_that_will_still_make_the_cursor_take_it(self) -> None:
        following = {1: (0, 8), 2: (0, 0), 3: (0, 16), 4: (0, 8)}
        until = {1: None, 2: None, 3: None, 4: None}
        assert groups.decode_takers(1, (0, 8), following, until) == {2, 4}  # 3 is past it

    def test_producers_whose_members_end_before_its_epoch_do_not(self) -> None:
        assert groups.decode_takers(1, (2, 0), {1: (2, 8), 2: (1, 0), 3: (0, 0)}, {1: None, 2: 2, 3: 3}) == {3}

    def test_a_member_that_has_not_read_since_it_was_detached_stays_out(self) -> None:
        still = groups.DetachedView("s", "lockstep", True, 5, 7, consumed_since_detach=False)
        assert groups.rejoins([still], window=8) == []
