"""HTTP/2 keepalive on both ends, so that a half-open peer (a trainer host that vanished, a
dropped NAT entry) is noticed in under a minute and its session and buffers are freed.

The server pings an idle connection every 30 s and gives up after 10 s without an answer; it
accepts client pings every 10 s or slower. Clients ping every 30 s (also between calls), which
stays inside what the server accepts, so a server never answers them with too_many_pings.
"""

from __future__ import annotations

PING_INTERVAL_MS = 30_000
PING_TIMEOUT_MS = 10_000
MIN_CLIENT_PING_INTERVAL_MS = 10_000

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", PING_INTERVAL_MS),
    ("grpc.keepalive_timeout_ms", PING_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
    ("grpc.http2.max_pings_without_data", 0),
]

CLIENT_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", PING_INTERVAL_MS),
    ("grpc.keepalive_timeout_ms", PING_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
