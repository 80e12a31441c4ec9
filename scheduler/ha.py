"""Single active beat: a lease in Redis, short and renewed, checked before every dispatch.

The lease is a key holding the holder's token, set with NX and a TTL of
`lease` seconds. The holder renews it every lease/3 (a Lua script renews only
if the key still holds its token). A holder counts itself active only until
`lease * SAFETY` after the moment it *sent* its last successful renewal, by
its own monotonic clock: a beat that stalls, or loses Redis, stops
dispatching before its lease can expire in Redis and another beat take over.
The lock is not the only guard: every tick is also claimed once in Redis
(scheduler.beat), so even two beats that both believe they are active
dispatch each tick once.
"""

from __future__ import annotations

import time

import redis

SAFETY = 0.8  # fraction of the lease a holder trusts its own clock for

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class Lease:
    def __init__(self, client: redis.Redis, key: str, token: str, seconds: float) -> None:
        self.client = client
        self.key = key
        self.token = token
        self.seconds = seconds
        self._valid_until = 0.0  # monotonic
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @property
    def held(self) -> bool:
        """True while this process may act as the active beat."""
        return time.monotonic() < self._valid_until

    def due(self) -> bool:
        """Time to renew (holder) or to try to take over (standby)."""
        left = self._valid_until - time.monotonic()
        return left < self.seconds * SAFETY * 2 / 3

    def refresh(self) -> bool:
        """Renew the lease, or acquire it if free; True if held afterwards.

        Redis errors propagate; the lease then runs out by the local clock.
        """
        sent = time.monotonic()
        millis = int(self.seconds * 1000)
        # Renew first: the key may still be ours even if our clock gave up on it.
        ok = bool(self._renew(keys=[self.key], args=[self.token, millis]))
        if not ok:
            ok = bool(self.client.set(self.key, self.token, nx=True, px=millis))
        self._valid_until = sent + self.seconds * SAFETY if ok else 0.0
        return ok

    def holder(self) -> str | None:
        value = self.client.get(self.key)
        return None if value is None else str(value)

    def release(self) -> None:
        """Give the lease up at once (graceful stop): a standby takes over immediately."""
        self._valid_until = 0.0
        self._release(keys=[self.key], args=[self.token])
