"""Per-minute rate limits, decided in each worker's memory and bounded across workers and pods.

Redis keeps two numbers per key and minute: `rl:` the hits counted and `rr:` the hits reserved by
workers, and a set of the workers that called it in the last minute (`rl-workers`, W: every call
is a heartbeat, and an idle worker calls every 20 s). A worker admits a hit without asking Redis in
two cases:
- from its reservation: a share of what is left, at most ceil((limit - counted - reserved) / W) and
  twice the key's hits in the last interval, taken atomically by the sync script (every 50 ms while
  the key is busy, given back after a quiet interval). Hits admitted this way can never pass the
  limit: the script never lets counted + reserved pass it.
- "blind", without a reservation (a key this worker has not seen busy): at most
  blind_budget(limit, W) such hits not yet counted in Redis at any time, and only while the last
  answer from Redis showed counted + reserved below the limit.
Past both, the key is at its edge and one script call counts this worker's pending hits and the
request's hit atomically (SessionStore.over_limit_exact): only a user at the edge of a limit pays a
round trip. The call carries every key of the request at its edge and counts the hit for all of
them or none, and a key that is full already refuses before it: a request one limit refuses is not
counted against another (a user's refused requests do not spend their address's limit). A caller that cannot wait (`check(..., edge=False)`) decides there from what this
worker knows, as before this bound: exact per worker, not across workers.

Bound, for callers that take the edge call (/go): only blind hits can pass a limit, and at most
W * blind_budget of them can be admitted against a full count (each worker stops at its first answer
showing the count full), so a limit L is overshot by at most max(L // 10, W) hits across all workers
(60/min with 2-4 workers: 66 at most). This holds only if no worker takes W smaller than it is:
Redis counts a worker from its first call, and a pod's workers start one after the other, so each
worker takes at least its own pod's worker count (`pod_workers`); a pod that starts while a key is at
its edge can still find the other pods' workers with a W it is not yet in, for up to one sync. Callers that cannot wait (observe, event streams) have no such
bound: at the edge each worker admits while its own view shows room, so a burst that reaches every
worker within one sync can pass L by up to (W - 1) * L.
While Redis is down each worker holds each limit on its own (W workers: up to W * L).
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable, Sequence

from .. import metrics

Check = tuple[str, str, int]  # scope, key, limit per minute (0: none)
Verdict = tuple[str, int] | None  # the refused scope and seconds to wait, or None: admitted
EDGE: tuple[str, int] = ("edge", 1)  # check(..., edge=True): ask Redis (SessionStore.over_limit_exact)
ASSUMED_WORKERS = 8  # until the first sync tells how many workers there are (a small blind budget)
LIVE_FOR = 60  # seconds a worker counts in W after its last call

# Appended to the batch script (sessions.py). ARGV[2]: one line per key: name (scope:key:minute),
# hits to count, reserved hits given back (used or released), reserved hits kept, limit, the
# reservation wanted, this worker's blind hits that an earlier call (maybe not yet run) carries,
# and 1 to admit one more hit if it fits. ARGV[3]: the rate limits' key prefix
# (redis_keys.limits_prefix: one hash tag for all of them), ARGV[4]: this worker's id,
# ARGV[5]: the time. Every call is also the worker's heartbeat. Replies W, then per key: counted,
# counted + reserved, this worker's reservation, room (0/1: the key had room for the hit). The hit
# is one request's: counted for every key of the call only if each had room (else for none).
COUNTS_LUA = r"""
local prefix, live, now = ARGV[3], ARGV[3] .. 'rl-workers', tonumber(ARGV[5])
redis.call('ZADD', live, now, ARGV[4])
redis.call('ZREMRANGEBYSCORE', live, '-inf', now - """ + str(LIVE_FOR) + r""")
redis.call('EXPIRE', live, """ + str(2 * LIVE_FOR) + r""")
local workers = redis.call('ZCARD', live)
local reply, rooms, all_room = {workers}, {}, true
for name, hits, back, kept, limit, want, pending, admit in string.gmatch(ARGV[2],
    '([^\t\n]+)\t(%d+)\t(%d+)\t(%d+)\t(%d+)\t(%d+)\t(%d+)\t([01])') do
  hits, back, kept, limit = tonumber(hits), tonumber(back), tonumber(kept), tonumber(limit)
  want, pending = tonumber(want), tonumber(pending)
  local counted, reserved = prefix .. 'rl:' .. name, prefix .. 'rr:' .. name
  local c = redis.call('INCRBY', counted, hits)
  if c == hits then
    redis.call('EXPIRE', counted, 61)  -- a new minute's key: give it its end
  end
  local r0 = tonumber(redis.call('GET', reserved) or 0)
  local r = math.max(r0 - back, 0)
  local room = 0
  if admit == '1' then
    if c + r + pending < limit then
      c, room = c + 1, 1  -- as if counted (below, once every key of the call has room)
      rooms[#rooms + 1] = {counted, #reply + 1}
    else
      all_room, want = false, 0
    end
  end
  local held = kept
  if want > kept then  -- a share of what is left, no more than this worker asks for
    local free = limit - c - (r - kept) - pending
    local share = math.min(free, math.ceil(free / workers), want)
    if share > held then
      r, held = r + share - held, share
    end
  end
  if r ~= r0 then
    redis.call('SET', reserved, r, 'EX', 61)
  end
  local n = #reply
  reply[n + 1], reply[n + 2], reply[n + 3], reply[n + 4] = c, c + r, held, room
end
for _, key in ipairs(rooms) do  -- one request's hit: counted for all of its keys or for none
  if all_room then
    redis.call('INCRBY', key[1], 1)
  else
    reply[key[2]], reply[key[2] + 1] = reply[key[2]] - 1, reply[key[2] + 1] - 1
  end
end
return reply
"""


def blind_budget(limit: int, workers: int) -> int:
    """Hits one worker may admit for a key without a reservation and not yet counted in Redis: a
    tenth of the limit shared by the workers, at least one (so the overshoot is at most
    max(limit // 10, workers))."""
    return max(1, limit // (10 * max(1, workers)))


class _Count:
    """One key's state in this worker for the current minute."""
    __slots__ = ("name", "limit", "allow", "base", "fresh", "blind", "counted", "full")

    def __init__(self, name: str, limit: int) -> None:
        self.name, self.limit = name, limit
        self.allow = 0  # reserved hits this worker may still admit
        self.base = 0  # the reservation as Redis knows it: allow + reserved hits admitted since the last send
        self.fresh = 0  # hits admitted without a reservation since the last send
        self.blind = 0  # of those, hits admitted blind that no answer from Redis has counted yet
        self.counted = 0  # Redis's count at its latest answer
        self.full = 0  # counted + reserved at that answer


Sent = list[tuple[str, _Count, int, int]]  # name, state, reservation kept, blind hits carried


class RateLimits:
    """This worker's side: local decisions and what to tell Redis. No I/O: SessionStore sends the
    lines (`batch`, `edge_lines`) and hands the answers back (`settle`, `settle_edge`)."""

    def __init__(self, wake: asyncio.Event | None = None, clock: Callable[[], float] = time.time,
                 pod_workers: int = 1) -> None:
        self.clock, self._wake = clock, wake or asyncio.Event()
        self.up = True  # False while Redis is down: each worker then holds the limits on its own
        # W never below this process's own pod (tracker serve --workers): Redis's set counts a worker
        # only from its first call, so a worker that started first would otherwise take the blind
        # budget of a smaller W while the others are still starting (a pod's workers start listening
        # one by one), and the budgets summed past the bound.
        self.pod_workers = max(1, pod_workers)
        self.workers = max(ASSUMED_WORKERS, self.pod_workers)
        self.window = 0
        self.counts: dict[str, _Count] = {}
        self.active: dict[str, _Count] = {}  # keys with something to tell Redis at the next sync

    def check(self, checks: Sequence[Check], edge: bool = False) -> Verdict:
        """Count one hit for each (scope, key, limit) if every scope admits it. Refused: the first
        scope over its limit and the seconds to wait. At a key's edge: EDGE if `edge` (the caller
        then awaits SessionStore.over_limit_exact), else decided from this worker's view alone."""
        now = self.clock()
        window = int(now // 60)
        if window != self.window:
            self.window, self.counts, self.active = window, {}, {}
        counts, active, up, shared = self.counts, self.active, self.up, 10 * self.workers
        i = reserved = 0  # reserved: a bit per check admitted from its reservation (to give back)
        for scope, key, limit in checks:
            if limit > 0:
                name = f"{scope}:{key}"
                st = counts.get(name)
                if st is None:
                    st = counts[name] = _Count(name, limit)
                if st.allow > 0:
                    st.allow -= 1
                    reserved |= 1 << i
                elif up and st.counted < limit and st.blind < (limit // shared or 1) and st.full + st.blind < limit:
                    st.fresh += 1  # blind, within blind_budget(limit, workers)
                    st.blind += 1
                else:
                    verdict = self._past_budget(st, scope, limit, now, edge)
                    if verdict is not None:
                        self._give_back(checks, i, reserved)
                        return verdict
                active[name] = st
            i += 1
        if active:
            self._wake.set()
        return None

    def _past_budget(self, st: _Count, scope: str, limit: int, now: float, edge: bool) -> Verdict:
        """check() for a key with neither a reservation nor blind budget left: None when admitted."""
        if not self.up:  # each worker on its own: what Redis last said plus this worker's hits since
            if st.counted + st.fresh + st.base - st.allow >= limit:
                return self._refuse(scope, int(60 - now % 60) + 1)
            st.fresh += 1
            return None
        if st.counted >= limit:
            return self._refuse(scope, int(60 - now % 60) + 1)
        if edge:
            return EDGE
        if st.full + st.blind >= limit:  # a caller that cannot wait: this worker's view decides
            return self._refuse(scope, 1)
        st.fresh += 1
        st.blind += 1
        return None

    def _give_back(self, checks: Sequence[Check], upto: int, reserved: int) -> None:
        """Undo the hits check() counted for the checks before `upto` (a later one refused)."""
        for i, (scope, key, limit) in enumerate(checks[:upto]):
            st = self.counts.get(f"{scope}:{key}")
            if limit <= 0 or st is None:
                continue
            if reserved >> i & 1:
                st.allow += 1
            else:
                st.fresh -= 1
                if self.up:
                    st.blind -= 1

    @staticmethod
    def _refuse(scope: str, retry: int) -> Verdict:
        metrics.RATE_LIMITED.labels(scope).inc()
        return scope, retry

    def _line(self, name: str, st: _Count, release: bool, admit: bool) -> tuple[str, int, int]:
        taken = st.base - st.allow
        hits = taken + st.fresh
        fresh, st.fresh = st.fresh, 0
        pending = max(0, st.blind - fresh)  # blind hits an earlier call carries: maybe not counted yet
        if release:  # quiet for an interval (or stopping): the whole reservation goes back
            back, kept, want = st.base, 0, 0
            st.allow = 0
        else:
            # A busy key asks for twice its last interval's hits (a quiet one for none: blind hits
            # serve it), so that no worker holds much more than it uses.
            back, kept = taken, st.allow
            want = 2 * (hits + 1) if admit else (2 * hits if hits > 1 or taken > 0 else 0)
        st.base = kept
        if "\t" in name or "\n" in name:  # the line's separators (a forwarded address is a header)
            name = name.replace("\t", " ").replace("\n", " ")
        line = f"{name}:{self.window}\t{hits}\t{back}\t{kept}\t{st.limit}\t{want}\t{pending}\t{int(admit)}"
        return line, kept, fresh

    def batch(self, final: bool = False) -> tuple[str, Sent, int]:
        """The lines of the next sync: keys with hits to count or a reservation to renew or give
        back (all of it when `final`), what was sent, and the minute."""
        active, self.active = self.active, {}
        lines, sent = [], []
        for name, st in active.items():
            if st.base == 0 and st.fresh == 0:
                continue
            quiet = st.base == st.allow and st.fresh == 0
            line, kept, fresh = self._line(name, st, final or quiet, False)
            lines.append(line)
            sent.append((name, st, kept, fresh))
        return "\n".join(lines), sent, self.window

    def settle(self, sent: Sent, reply: list[int] | None, window: int) -> None:
        """Apply a sync's answer. None: it failed, and the hits it carried count again in this
        worker's view and go with the next call (reservations it may have taken stay in Redis until
        the minute ends). Dropping them instead let a worker admit them a second time right after a
        failed call: an address at its limit got another request through when a sync timed out.
        A call that timed out after Redis ran it has its hits counted twice: the count errs high, by
        one interval's hits, only when Redis failed to answer in time."""
        if reply:
            self.workers = max(self.pod_workers, int(reply[0]))
        for i, (name, st, kept, fresh) in enumerate(sent):
            if reply:
                st.blind = max(0, st.blind - fresh)
                self._learn(name, st, kept, reply[1 + 4 * i:5 + 4 * i], window)
            elif fresh:
                st.fresh += fresh  # still blind: no answer has counted them
                if window == self.window:
                    self.active[name] = st

    def _at_edge(self, st: _Count | None) -> bool:
        return not (st is None or st.allow > 0 or not self.up or st.counted >= st.limit
                    or (st.blind < blind_budget(st.limit, self.workers) and st.full + st.blind < st.limit))

    def at_edge(self, checks: Sequence[Check]) -> tuple[list[Check], Verdict]:
        """For a request check() found at the edge of a limit: its keys at their edge (Redis decides
        them, in one call), or the refusal of a key that is full already (then no call is made, and
        no key counts a request that another refuses)."""
        edge = []
        for check in checks:
            scope, key, limit = check
            st = self.counts.get(f"{scope}:{key}") if limit > 0 else None
            if st is not None and st.allow == 0 and self.up and st.counted >= limit:
                return [], self._refuse(scope, int(60 - self.clock() % 60) + 1)
            if self._at_edge(st):
                edge.append(check)
        return edge, None

    def edge_lines(self, names: Sequence[str]) -> tuple[str, Sent, int] | None:
        """For one request's keys at the edge of their limits, the lines that count their pending
        hits and admit the request's hit if every key has room; None if none is (still) at its edge."""
        lines, sent = [], []
        for name in names:
            st = self.counts.get(name)
            if st is not None and self._at_edge(st):
                line, kept, fresh = self._line(name, st, False, True)
                lines.append(line)
                sent.append((name, st, kept, fresh))
        return ("\n".join(lines), sent, self.window) if sent else None

    def settle_edge(self, sent: Sent, reply: list[int] | None, window: int) -> bool | None:
        """Apply an edge call's answer: admitted or not, None when it failed."""
        self.settle(sent, reply, window)
        return all(reply[4::4]) if reply else None

    def _learn(self, name: str, st: _Count, kept: int, answer: list[int], window: int) -> None:
        counted, full, held = int(answer[0]), int(answer[1]), int(answer[2])
        # Answers can arrive out of order (several connections): the count only grows, so an answer
        # with a smaller one is older and its "full" is not taken; on a tie the larger is kept.
        if counted > st.counted:
            st.counted, st.full = counted, full
        elif counted == st.counted and full > st.full:
            st.full = full
        if held > kept:
            granted = held - kept
            # Hits admitted since this call was built (blind, while it was in flight) were unknown to
            # Redis when it granted the share: they take it first, instead of the share admitting
            # as many more on top of them (one worker alone passed a limit of 3 by one that way).
            cover = min(granted, st.fresh) if self.up else 0
            st.fresh -= cover
            st.blind = max(0, st.blind - cover)
            st.allow += granted - cover
            st.base += granted
        if st.base > 0 and window == self.window:
            self.active[name] = st  # renewed or given back at the next sync
