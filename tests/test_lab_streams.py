"""
Streams and their applications through real kernel NATs (issue 10's proof):
the NAT lab, a real mediator, real peers as the user runs them, 20 ms of
delay on every site link.

- C{natbypass forward -L} to a TCP sink exposed by C{twistd natbypass-peer
  --expose sink=... --allow FILE}, over udp and tcp, for two representative
  pairs (full-cone -> port-restricted-cone, symmetric-random ->
  restricted-cone), every byte sha256-checked by the sink;
- twenty forwarded connections at once, each checked;
- a forward to what the peer does not expose: the clear error on the
  connecting side while other forwarded connections go on;
- C{natbypass pipe} between the same pairs, both ways at once, sha256-checked;
- a twisted.web page served on a C{natbypass:web} server endpoint string in
  one NAT site, fetched by Agent through a C{natbypass:} client endpoint
  string from another.

Every pair that connects, over both protocols: C{bench/streams_matrix.py}.
Needs root, ip and nft; skipped with the reason otherwise.
"""

from __future__ import annotations

import threading
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from natbypass.lab import netns
from natbypass.lab.streams import SendResult, StreamScenario

SKIP = netns.missing_requirements()

#: Connecting site -> serving site; the serving peer's id is its site's name.
PAIRS = {"fc1": "prc2", "symr1": "rc2"}
SPEC = {
    "sites": {
        "fc1": {"nat": "full-cone", "delay_ms": 20},
        "prc2": {"nat": "port-restricted-cone", "delay_ms": 20},
        "symr1": {"nat": "symmetric-random", "delay_ms": 20},
        "rc2": {"nat": "restricted-cone", "delay_ms": 20},
    }
}
#: The bytes of the one big forwarded connection, and of each of the concurrent ones.
BIG = 3_000_000
EACH = 200_000
CONCURRENT = 20

_shared: dict[str, Any] = {}


def shared_scenario() -> StreamScenario:
    """
    One lab, mediator, sinks and serving peers for the whole module (trial
    has no setUpClass): built by the first test that needs it, removed by the
    lab's own atexit handler when the test process ends.
    """
    if "error" in _shared:
        raise RuntimeError(f"the shared lab could not be built: {_shared['error']}")
    if "scenario" not in _shared:
        from natbypass.lab.lab import Lab

        lab = Lab.start(SPEC)
        try:
            scenario = StreamScenario(lab)
            scenario.start_mediator()
            allow = scenario.write_allow([*PAIRS, *PAIRS.values()])
            for server in PAIRS.values():
                scenario.start_server(server, server, scenario.start_sink(server), allow)
        except BaseException as e:
            _shared["error"] = repr(e)
            lab.stop()
            raise
        _shared["scenario"] = scenario
    return _shared["scenario"]


class LabStreamsTests(SynchronousTestCase):
    skip = SKIP

    def setUp(self) -> None:
        self.scenario = shared_scenario()

    def assertIntact(self, sent: SendResult, count: int, context: str) -> None:
        bad = [r for r in sent.results if r["error"] is not None or r["answer"] != r["sha256"]]
        self.assertEqual(bad, [], context)
        self.assertEqual(sent.intact, count, context)

    def check_forward(self, src: str, protocol: str) -> None:
        """One big connection through -L, sha256-checked; the events say what happened."""
        dst = PAIRS[src]
        fwd = self.scenario.forward(src, f"fwd-{src}-{protocol}", dst, protocol)
        try:
            sent = fwd.send(1, BIG)
        finally:
            code, events = fwd.stop()
        context = f"{src} -> {dst} over {protocol}: {events}"
        self.assertIntact(sent, 1, context)
        self.assertEqual(code, 0, context)
        opened = [e for e in events if e["event"] == "opened"]
        closed = [e for e in events if e["event"] == "closed"]
        self.assertEqual([e["path"] for e in opened], [protocol], context)
        self.assertEqual([(e["bytes_sent"], e["bytes_received"]) for e in closed], [(BIG, 64)], context)
        self.assertNotIn("reason", closed[0], context)
        self.assertEqual([e for e in events if e["event"] == "error"], [], context)

    def check_pipe(self, src: str, protocol: str) -> None:
        """A file each way at once through natbypass pipe; both ends exit 0, both files intact."""
        dst = PAIRS[src]
        result = self.scenario.pipe(src, dst, f"pipe-{src}-{protocol}", protocol, 2_000_000, back=300_000)
        self.assertTrue(result.ok, f"{src} -> {dst} over {protocol}: {result.summary()}")

    def test_forward_fc_prc_udp(self) -> None:
        """full-cone -> port-restricted-cone, udp: 3 MB through forward intact."""
        self.check_forward("fc1", "udp")

    def test_forward_fc_prc_tcp(self) -> None:
        """full-cone -> port-restricted-cone, tcp: 3 MB through forward intact."""
        self.check_forward("fc1", "tcp")

    def test_forward_symr_rc_udp(self) -> None:
        """symmetric-random -> restricted-cone, udp: 3 MB through forward intact."""
        self.check_forward("symr1", "udp")

    def test_forward_symr_rc_tcp(self) -> None:
        """symmetric-random -> restricted-cone, tcp: 3 MB through forward intact."""
        self.check_forward("symr1", "tcp")

    def check_concurrent(self, src: str, protocol: str) -> None:
        """Twenty forwarded connections at once, each its own stream, each digest right, one path."""
        fwd = self.scenario.forward(src, f"many-{src}-{protocol}", PAIRS[src], protocol)
        try:
            sent = fwd.send(CONCURRENT, EACH)
        finally:
            code, events = fwd.stop()
        context = f"{src} over {protocol}: {events[-5:]}"
        self.assertIntact(sent, CONCURRENT, context)
        self.assertEqual(code, 0, context)
        opened = [e for e in events if e["event"] == "opened"]
        self.assertEqual(len(opened), CONCURRENT, context)
        self.assertEqual(len({e["stream_id"] for e in opened}), CONCURRENT, context)
        self.assertEqual({e["path"] for e in opened}, {protocol}, context)
        closed = [e for e in events if e["event"] == "closed"]
        self.assertEqual(sorted(e["bytes_sent"] for e in closed), [EACH] * CONCURRENT, context)

    def test_concurrent_forwards_udp(self) -> None:
        self.check_concurrent("fc1", "udp")

    def test_concurrent_forwards_tcp(self) -> None:
        self.check_concurrent("symr1", "tcp")

    def test_expose_refusal(self) -> None:
        """
        A forward to 127.0.0.1:22, which the peer does not expose: that
        connection is closed with no data and the connecting side says why
        (the peer refused it, and how to expose a target), while five other
        forwarded connections through the same peer connection, in flight at
        the same time, arrive intact.
        """
        src = "symr1"
        fwd = self.scenario.forward(src, "refused", PAIRS[src], "udp", targets=("sink", "127.0.0.1:22"))
        good: list[SendResult] = []
        try:
            worker = threading.Thread(target=lambda: good.append(fwd.send(5, 500_000)))
            worker.start()
            refused = fwd.send(1, 1000, port_index=1)
            worker.join(120)
        finally:
            code, events = fwd.stop()
        self.assertEqual(len(good), 1, events)
        self.assertIntact(good[0], 5, str(events))
        self.assertEqual([(r["answer"], r["error"]) for r in refused.results], [("", None)])
        errors = [e for e in events if e["event"] == "error"]
        self.assertEqual(len(errors), 1, events)
        self.assertEqual(errors[0]["service"], "forward:127.0.0.1:22")
        self.assertIn("rc2 refused 127.0.0.1:22: rc2 has no service 'forward:127.0.0.1:22'", errors[0]["reason"])
        self.assertIn("--expose", errors[0]["reason"])
        self.assertEqual(code, 0)

    def test_pipe_fc_prc_udp(self) -> None:
        self.check_pipe("fc1", "udp")

    def test_pipe_fc_prc_tcp(self) -> None:
        self.check_pipe("fc1", "tcp")

    def test_pipe_symr_rc_udp(self) -> None:
        self.check_pipe("symr1", "udp")

    def test_pipe_symr_rc_tcp(self) -> None:
        self.check_pipe("symr1", "tcp")

    def test_web_page_through_endpoint_strings(self) -> None:
        """
        A Site on C{natbypass:web:...} in the restricted-cone site, fetched
        with Agent through C{natbypass:web-server:web:...} from the
        symmetric-random one, over udp then tcp: status 200, the body's
        sha256, and the server saw the fetching peer, service and path.
        """
        proc, ready = self.scenario.web_serve("rc2", "web-server", 300_000)
        try:
            for protocol in ("udp", "tcp"):
                got = self.scenario.web_get("symr1", f"web-get-{protocol}", "web-server", protocol)
                self.assertEqual(got.get("event"), "fetched", got)
                self.assertEqual((got["code"], got["size"]), (200, ready["size"]), got)
                self.assertEqual(got["sha256"], ready["sha256"], got)
                self.assertEqual(got["x_peer"], f"web-get-{protocol} web {protocol}", got)
        finally:
            proc.terminate()
            proc.wait(10)
