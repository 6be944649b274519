"""Streams that have not yet opened a session: a deadline for their first message and bounds in
all and per peer, so that idle connections can never take the server's RPC threads.

A legitimate client sends its open message at once, so when a bound is reached the stream that
has waited longest is cut to make room: idle streams crowd out only each other.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from typing import Callable


def peer_host(peer: str) -> str:
    """The host part of a gRPC peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:...")."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, _, _ = rest.rpartition(":")
        return host
    return peer


class PendingOpens:
    """Streams waiting for their open message, oldest first, each with the call that cuts it."""

    def __init__(self, max_total: int, max_per_peer: int) -> None:
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        self._lock = threading.Lock()
        self._waiting: OrderedDict[int, tuple[str, Callable[[], None]]] = OrderedDict()
        self._tickets = itertools.count()

    def enter(self, host: str, cut: Callable[[], None]) -> int:
        """Admit a stream from `host`, cutting the longest-waiting ones past a bound; returns
        its ticket for `leave`."""
        evicted = []
        with self._lock:
            same_host = [ticket for ticket, (other, _) in self._waiting.items() if other == host]
            while len(same_host) >= self.max_per_peer:
                evicted.append(self._waiting.pop(same_host.pop(0))[1])
            while len(self._waiting) >= self.max_total:
                evicted.append(self._waiting.popitem(last=False)[1][1])
            ticket = next(self._tickets)
            self._waiting[ticket] = (host, cut)
        for cut_stream in evicted:
            cut_stream()
        return ticket

    def leave(self, ticket: int) -> None:
        with self._lock:
            self._waiting.pop(ticket, None)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._waiting)
