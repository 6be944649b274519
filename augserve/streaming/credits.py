"""Flow control of one session: the client grants credits, each batch sent uses one.

Credits are honoured, never dropped: the window is whatever the client granted. That costs the
server nothing, since a batch is only ever sent from a slot the producer already filled; the
producer's ring, not the credit count, bounds memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from augserve.core.errors import SpecError

MAX_OUTSTANDING_CREDITS = 2**40  # beyond any stream's length; keeps the counter bounded


@dataclass
class CreditWindow:
    """`granted` batches in total may be sent; `sent` have been."""

    granted: int
    sent: int = 0

    def grant(self, batches: int) -> None:
        if batches < 0:
            raise SpecError("credit.batches", "must not be negative")
        if self.granted - self.sent + batches > MAX_OUTSTANDING_CREDITS:
            raise SpecError("credit.batches", f"more than {MAX_OUTSTANDING_CREDITS} batches of credit outstanding")
        self.granted += batches

    @property
    def may_send(self) -> bool:
        return self.sent < self.granted

    @property
    def available(self) -> int:
        return self.granted - self.sent

    def use(self) -> None:
        if not self.may_send:
            raise RuntimeError("no credit to send a batch")
        self.sent += 1
