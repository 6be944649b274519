"""Group decisions: when a producer may make its next batch, and which members to detach.

Plain functions of plain numbers, so they are tested without threads, sockets or sleeps. The
producer thread asks `may_produce` about itself; the manager asks `stragglers` about a group and
carries out the detaches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


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
) -> bool:
    """Whether a producer makes its next batch now.

    A new group gathers its announced members (at most `group_wait_seconds`) before its first
    batch only: members may leave later without stopping the others.
    """
    gathering = produced == 0 and members < expected_members and waited_seconds < group_wait_seconds
    still_needed = needed_until_epoch is None or cursor_epoch < needed_until_epoch
    return members > 0 and not gathering and still_needed and has_slot


@dataclass(frozen=True)
class MemberView:
    """What the straggler decision needs to know about one member of a group."""

    session_id: str
    behind: int  # batches the producer made that this member has not been sent yet
    holds_oldest: bool  # still references the oldest buffered batch (so it blocks its slot)
    policy: str  # lockstep | detach
    idle_seconds: float  # since it last consumed a batch


@dataclass(frozen=True)
class Detach:
    session_id: str
    reason: str


def stragglers(members: Sequence[MemberView], *, blocked: bool, window: int, stall_seconds: float) -> list[Detach]:
    """Members to move onto producers of their own, for a producer with no free slot.

    A detach-policy member a whole `window` behind goes; so does any member that consumed
    nothing for `stall_seconds`. Only members that hold the oldest batch block the group. The
    member furthest ahead always stays, so a group is never dissolved into copies of itself.
    """
    if not blocked or len(members) < 2:
        return []
    decisions = []
    for member in members:
        if not member.holds_oldest:
            continue
        too_far = member.policy == "detach" and member.behind >= window
        stalled = member.idle_seconds > stall_seconds
        if too_far or stalled:
            decisions.append(Detach(member.session_id, "fell behind its group" if too_far else "stalled"))
    if len(decisions) == len(members):
        leader = min(members, key=lambda member: (member.behind, member.idle_seconds))
        decisions = [decision for decision in decisions if decision.session_id != leader.session_id]
    return decisions
