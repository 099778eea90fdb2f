"""In-memory doubles of the cluster's Redis: a directory and the pub/sub fabric that joins several of them."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from natbypass.signaling.cluster import IClusterDirectory
from natbypass.signaling.resp import ClusterUnavailable


class FakeRedis:
    """The directory's Redis, in memory: keys with expiry, one channel per node, messages queued until C{flush}."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.keys: dict[str, tuple[Any, float]] = {}
        self.nodes: dict[str, FakeDirectory] = {}
        self.queue: list[tuple[str, bytes]] = []
        self.up = True

    def get(self, k: str) -> Any:
        v = self.keys.get(k)
        if v is None or v[1] <= self.clock.seconds():
            self.keys.pop(k, None)
            return None
        return v[0]

    def set(self, k: str, v: Any, ttl: float) -> None:
        self.keys[k] = (v, self.clock.seconds() + ttl)

    def publish(self, node: str, payload: bytes) -> int:
        if node not in self.nodes or not self.nodes[node].available:
            return 0
        self.queue.append((node, payload))
        return 1

    def flush(self) -> None:
        while self.queue:
            node, payload = self.queue.pop(0)
            if node in self.nodes:
                self.nodes[node].receiver.cluster_message(payload)


@implementer(IClusterDirectory)
class FakeDirectory:
    """An L{IClusterDirectory} of one mediator node over a shared L{FakeRedis}."""

    def __init__(self, redis: FakeRedis, node: str) -> None:
        self.redis, self.node = redis, node
        self.available = True
        self.rtt = 0.001
        redis.nodes[node] = self
        self.receiver: Any = None

    def set_receiver(self, receiver: Any) -> None:
        self.receiver = receiver

    def _ok(self) -> bool:
        return self.available and self.redis.up

    def claim(self, peer_id, digest, bind_ttl, presence_ttl, owns, replace, max_ids=0):
        if not self._ok():
            return fail(ClusterUnavailable("down"))
        r = self.redis
        b, p = r.get("bind:" + peer_id), r.get("peer:" + peer_id)
        if b is not None and b != digest and not owns:
            return succeed(("bound", 1000, p or ""))
        if p is not None and p != self.node and not replace:
            return succeed(("duplicate", 0, p))
        if b is None and max_ids:
            bound = sum(1 for k in list(r.keys) if k.startswith("bind:") and r.get(k) is not None)
            if bound >= max_ids:
                return succeed(("full", bound, ""))
        r.set("bind:" + peer_id, digest, bind_ttl)
        r.set("peer:" + peer_id, self.node, presence_ttl)
        return succeed(("new" if b is None else "same" if b == digest else "rebound", 0, p or ""))

    def leave(self, peer_id, hold):
        r = self.redis
        if self._ok() and r.get("peer:" + peer_id) == self.node:
            r.keys.pop("peer:" + peer_id, None)
            if hold > 0:
                r.set("bind:" + peer_id, r.get("bind:" + peer_id), hold)
            else:
                r.keys.pop("bind:" + peer_id, None)

    def route(self, peer_id, payload):
        if not self._ok():
            return fail(ClusterUnavailable("down"))
        n = self.redis.get("peer:" + peer_id)
        if n is None:
            return succeed((-1, ""))
        if n == self.node:
            return succeed((-2, n))
        return succeed((self.redis.publish(n, payload), n))

    def publish(self, node, payload):
        if self._ok():
            self.redis.publish(node, payload)

    def refresh(self, entries, bind_ttl, presence_ttl):
        lost = []
        for peer_id, digest in entries:
            b, p = self.redis.get("bind:" + peer_id), self.redis.get("peer:" + peer_id)
            if (b is not None and b != digest) or (p is not None and p != self.node):
                lost.append(peer_id)
            else:
                self.redis.set("bind:" + peer_id, digest, bind_ttl)
                self.redis.set("peer:" + peer_id, self.node, presence_ttl)
        return succeed(lost)

    def publish_nat(self, peer_id, nat, ttl):
        self.redis.set("nat:" + peer_id, nat, ttl)

    def status(self):
        return {"node": self.node, "available": self.available, "rtt_ms": 1.0, "reconnects": 0}
