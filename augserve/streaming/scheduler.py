"""Fair turns at the backend for many producers.

Producers wait in one FIFO queue for a turn to run a batch; a producer that had a turn queues
again at the back, so every waiting producer gets one batch in before anyone gets two
(round-robin by batches). `concurrency` turns run at once: 2 keeps the OpenCV thread pool busy
while the other producer is in Python; DALI serialises its pipeline anyway.
"""

from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager
from typing import Iterator


class FairScheduler:
    def __init__(self, concurrency: int = 1) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency: {concurrency} is below 1")
        self.concurrency = concurrency
        self._condition = threading.Condition()
        self._queue: deque[object] = deque()
        self._running = 0
        self.turns_granted = 0

    @contextmanager
    def turn(self) -> Iterator[None]:
        ticket = object()
        with self._condition:
            self._queue.append(ticket)
            while self._queue[0] is not ticket or self._running >= self.concurrency:
                self._condition.wait()
            self._queue.popleft()
            self._running += 1
            self.turns_granted += 1
            self._condition.notify_all()
        try:
            yield
        finally:
            with self._condition:
                self._running -= 1
                self._condition.notify_all()

    @property
    def waiting(self) -> int:
        with self._condition:
            return len(self._queue)
