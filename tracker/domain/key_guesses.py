"""Wrong admin keys per client: GUESSES of them within WINDOW seconds, and every admin request and
console sign-in from that client is refused (429) until the oldest of them is WINDOW seconds old,
the right key included. A guesser then gets GUESSES tries a window instead of thousands a second.

This is the in-process count: the one each worker keeps for itself (the Redis count in
store/key_guard.py is shared by every worker and pod; while Redis is down this one decides alone).
Only the newest GUESSES times of a client are kept, and the table of clients is bounded."""
from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque

from . import addresses

GUESSES = 10
WINDOW = 60.0


def guesser(address: str) -> str:
    """Whom the count is kept for: an IPv4 address, or an IPv6 address's /64, the network one
    subscriber gets (a guesser holding a /64 has 2^64 addresses to rotate through)."""
    ip = addresses.address(address)  # an IPv4-mapped one as the IPv4 address it carries
    if ip is None:
        return address.replace("{", "").replace("}", "")[:64]  # a Redis hash tag holds it (key_guard.py)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class Guesses:
    """The newest wrong-key times (seconds, any monotonic clock) of each client in this process."""
    MAX_CLIENTS = 100_000

    def __init__(self, limit: int = GUESSES, window: float = WINDOW) -> None:
        self.limit, self.window = limit, window
        self._times: OrderedDict[str, deque[float]] = OrderedDict()

    def wait(self, client: str, now: float) -> float:
        """Seconds until `client` may try a key again (0: now)."""
        times = self._times.get(client)
        if times is None:
            return 0.0
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._times[client]
            return 0.0
        return times[0] + self.window - now if len(times) >= self.limit else 0.0

    def wrong(self, client: str, now: float) -> float:
        """Count a wrong key unless the client is refused already: the wait before it (0: it was
        within the allowance and is counted now)."""
        wait = self.wait(client, now)
        if wait > 0:
            return wait
        times = self._times.get(client)
        if times is None:
            if len(self._times) >= self.MAX_CLIENTS:
                self._times.popitem(last=False)  # the client first seen longest ago
            times = self._times[client] = deque(maxlen=self.limit)
        self._times.move_to_end(client)  # the table forgets the client quiet longest first
        times.append(now)
        return 0.0
