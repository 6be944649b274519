"""Group decisions: when a producer may make its next batch, which members to detach, which
detached members rejoin their group, and which producers will take a decoded batch.

Plain functions of plain numbers, so they are tested without threads, sockets or sleeps. The
producer thread asks `may_produce` about itself; the manager asks `stragglers` and `rejoins`
about a group and carries out the detaches and rejoins; a decode group asks `decode_takers`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Sequence

Cursor = tuple[int, int]  # (epoch, position), as in cursor.py


def needed_until(end_epochs: Sequence[int | None]) -> int | None:
    """The first epoch no member needs (None: some member is endless)."""
    if any(end is None for end in end_epochs):
        return None
    return max((end for end in end_epochs if end is not None), default=0)


def may_produce(
    *,
    members: int,
    expected_members: int,
    produced: int,
    waited_seconds: float,
    group_wait_seconds: float,
    needed_until_epoch: int | None,
    cursor_epoch: int,
    has_slot: bool,
    order_sessions: int = 0,
    expected_order_sessions: int = 0,
    below_ceiling: bool = True,
) -> bool:
    """Whether a producer makes its next batch now.

    A new group gathers its announced members (at most `group_wait_seconds`) before its first
    batch only: members may leave later without stopping the others. It also gathers the
    sessions announced on its dataset order (`expected_order_sessions`: same dataset, split,
    seed, batch size and shard, any spec), so that the producers of different specs decode
    each image once from the first batch on. `below_ceiling` is False for a detached member's
    producer that reached its old group's window: the member takes the rest from the group.
    """
    announced = members < expected_members or order_sessions < expected_order_sessions
    gathering = produced == 0 and announced and waited_seconds < group_wait_seconds
    still_needed = needed_until_epoch is None or cursor_epoch < needed_until_epoch
    return members > 0 and not gathering and still_needed and has_slot and below_ceiling


def below_ceiling(cursor: Cursor, ceiling: Cursor | None) -> bool:
    """Whether a detached member's producer may make the batch at `cursor`: only batches its
    old group no longer holds (`ceiling`: the group's oldest buffered batch; None: no group to
    go back to). What the group still holds, the member takes from the group once it rejoins."""
    return ceiling is None or cursor < ceiling


@dataclass(frozen=True)
class MemberView:
    """What the straggler decision needs to know about one member of a group."""

    session_id: str
    behind: int  # batches the producer made that this member has not been sent yet
    holds_oldest: bool  # still references the oldest buffered batch (so it blocks its slot)
    policy: str  # lockstep | detach
    idle_seconds: float  # since it last consumed a batch (or its pause ran out)
    paused: bool = False  # it said it pauses (validation, a checkpoint) and the pause has not run out


@dataclass(frozen=True)
class Detach:
    session_id: str
    reason: str


def stragglers(members: Sequence[MemberView], *, blocked: bool, window: int, stall_seconds: float) -> list[Detach]:
    """Members to move onto producers of their own, for a producer with no free slot.

    A detach-policy member a whole `window` behind goes; so does any member that consumed
    nothing for `stall_seconds`, unless it is paused: the group waits for a paused lockstep
    member (a detach-policy one still goes a window behind, and may rejoin later). Only members
    that hold the oldest batch block the group. The member furthest ahead always stays, so a
    group is never dissolved into copies of itself.
    """
    if not blocked or len(members) < 2:
        return []
    decisions = []
    for member in members:
        if not member.holds_oldest:
            continue
        too_far = member.policy == "detach" and member.behind >= window
        stalled = member.idle_seconds > stall_seconds and not member.paused
        if too_far or stalled:
            decisions.append(Detach(member.session_id, "fell behind its group" if too_far else "stalled"))
    if len(decisions) == len(members):
        leader = min(members, key=lambda member: (member.behind, member.idle_seconds))
        decisions = [decision for decision in decisions if decision.session_id != leader.session_id]
    return decisions


@dataclass(frozen=True)
class DetachedView:
    """A member on a producer of its own since it was detached, against its old group."""

    session_id: str
    policy: str
    group_alive: bool  # the old group still produces for members of its own
    sequence_in_group: int | None  # the group's batch at the member's next cursor, if buffered or next
    group_next_sequence: int  # the group's next batch to make
    consumed_since_detach: bool = True  # it took a batch since it was detached (it reads again)


@dataclass(frozen=True)
class Rejoin:
    session_id: str
    sequence: int  # in the group's numbering: the member continues from this batch


def rejoins(detached: Sequence[DetachedView], *, window: int) -> list[Rejoin]:
    """Detached members that go back to their old group: those that read again and whose next
    batch the group still holds (or makes next). One that has taken nothing since it was
    detached stays out (it would stall its group again), as does a detach-policy member that
    would be a whole `window` behind (it would be detached again at once): it may come closer."""
    decisions = []
    for member in detached:
        if not member.group_alive or member.sequence_in_group is None or not member.consumed_since_detach:
            continue
        behind = member.group_next_sequence - member.sequence_in_group
        if member.policy == "detach" and behind >= window:
            continue
        decisions.append(Rejoin(member.session_id, member.sequence_in_group))
    return decisions


def decode_takers(
    decoder: int, cursor: Cursor, next_cursors: Mapping[int, Cursor], until_epochs: Mapping[int, int | None]
) -> set[int]:
    """The producers of a decode group (same dataset order) that will still make the batch at
    `cursor`, besides its `decoder`: those whose next batch is not past it and whose members
    still need its epoch (`until_epochs`: the first epoch none needs; None: endless)."""
    takers = set()
    for member, following in next_cursors.items():
        until = until_epochs.get(member)
        if member != decoder and following <= cursor and (until is None or cursor[0] < until):
            takers.add(member)
    return takers
