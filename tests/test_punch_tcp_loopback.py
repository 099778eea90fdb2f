"""natbypass.punch.tcp on real sockets: 127.0.0.1, and (as root) a private network namespace."""

from __future__ import annotations

import socket

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from natbypass.identity import Identity
from natbypass.punch.session import PunchFailed, PunchSession
from natbypass.punch.tcp import punch_tcp, reusable_socket
from natbypass.secure import ChannelSecurity
from natbypass.secure.tls import PeerRefusedUs
from natbypass.testing.connection import RecordingReceiver
from natbypass.trust import pinned

KEY = b"k" * 32
S0 = PunchSession("sess-7", KEY, 0, peer_id="bob")
S1 = PunchSession("sess-7", KEY, 1, peer_id="alice")
ALICE, BOB, MALLORY = Identity.generate(), Identity.generate(), Identity.generate()
#: Role 0 is alice, role 1 is bob; each pins the other.
SEC0 = ChannelSecurity(ALICE, pinned(BOB.fingerprint))
SEC1 = ChannelSecurity(BOB, pinned(ALICE.fingerprint))


def _port(sock: socket.socket) -> int:
    return sock.getsockname()[1]


class LoopbackTests(TestCase):
    """Real sockets on 127.0.0.1."""

    def listener(self):
        sock = reusable_socket(("127.0.0.1", 0), listen=True)
        self.addCleanup(sock.close)
        return sock

    @defer.inlineCallbacks
    def exchange(self, c0, c1):
        r0, r1 = RecordingReceiver(), RecordingReceiver()
        c0.setReceiver(r0)
        c1.setReceiver(r1)
        c0.send(b"from role 0")
        c1.send(b"from role 1")
        yield defer.gatherResults([r0.got, r1.got])
        self.assertEqual((r0.data, r1.data), (b"from role 1", b"from role 0"))
        lost = c1.whenLost()
        c0.close()
        yield lost

    @defer.inlineCallbacks
    def test_both_listen(self):
        """Both connect to each other from their listening port; one connection results."""
        l0, l1 = self.listener(), self.listener()
        a0 = ("127.0.0.1", _port(l0))
        a1 = ("127.0.0.1", _port(l1))
        c0, c1 = yield defer.gatherResults(
            [
                punch_tcp(reactor, S0, a0, [a1], start_delay=0.01, listener=l0, window=3, security=SEC0),
                punch_tcp(reactor, S1, a1, [a0], start_delay=0.01, listener=l1, window=3, security=SEC1),
            ]
        )
        self.assertEqual(
            (c0.secure, c0.peer_fingerprint, c1.peer_fingerprint), (True, BOB.fingerprint, ALICE.fingerprint)
        )
        self.assertTrue(c0.cipher.startswith("TLSv1.3 TLS_"), c0.cipher)
        self.assertGreater(c0.handshake_ms, 0)
        self.assertEqual((c0.local_address.port, c1.local_address.port), (a0[1], a1[1]))
        self.assertEqual((c0.remote_address.port, c1.remote_address.port), (a1[1], a0[1]))
        yield self.exchange(c0, c1)

    @defer.inlineCallbacks
    def test_one_side_listens(self):
        """Role 1 cannot accept (RST on its port); role 0's listener takes role 1's connect."""
        l0 = self.listener()
        holder = reusable_socket(("127.0.0.1", 0))  # reserves role 1's port, not listening
        self.addCleanup(holder.close)
        a0, a1 = ("127.0.0.1", _port(l0)), ("127.0.0.1", _port(holder))
        c0, c1 = yield defer.gatherResults(
            [
                punch_tcp(reactor, S0, a0, [a1], listener=l0, window=3, security=SEC0),
                punch_tcp(reactor, S1, a1, [a0], start_delay=0.2, window=3, security=SEC1),
            ]
        )
        self.assertEqual(c1.local_address.port, a1[1])
        yield self.exchange(c0, c1)

    @defer.inlineCallbacks
    def test_impostor_on_listener_ignored(self):
        """Third parties connecting first (one sends junk, one stays silent) do not take the path."""
        l0, l1 = self.listener(), self.listener()
        a0, a1 = ("127.0.0.1", _port(l0)), ("127.0.0.1", _port(l1))
        evil = socket.create_connection(a0)
        self.addCleanup(evil.close)
        evil.sendall(b"\x16\x03\x01\x00\x05junk!")
        silent = socket.create_connection(a1)
        self.addCleanup(silent.close)
        d0 = punch_tcp(reactor, S0, a0, [a1], start_delay=0.3, listener=l0, window=3, security=SEC0)
        d1 = punch_tcp(reactor, S1, a1, [a0], start_delay=0.3, listener=l1, window=3, security=SEC1)
        c0, c1 = yield defer.gatherResults([d0, d1])
        self.assertEqual(c0.remote_address.port, a1[1])
        yield self.exchange(c0, c1)

    @defer.inlineCallbacks
    def test_nobody_there(self):
        holder = reusable_socket(("127.0.0.1", 0))
        self.addCleanup(holder.close)
        l0 = self.listener()
        d = punch_tcp(reactor, S0, ("127.0.0.1", _port(l0)), [("127.0.0.1", _port(holder))], window=0.5, security=SEC0)
        f = yield self.assertFailure(d, PunchFailed)
        self.assertIn("ECONNREFUSED", f.reason)
        self.assertIn("within 0.5 s", f.reason)

    @defer.inlineCallbacks
    def test_wrong_key_refused(self):
        """
        Over real sockets, a peer with another key than the pinned one fails both
        attempts when the window closes, each saying why.
        """
        l0, l1 = self.listener(), self.listener()
        a0, a1 = ("127.0.0.1", _port(l0)), ("127.0.0.1", _port(l1))
        mallory = ChannelSecurity(MALLORY, pinned(ALICE.fingerprint))
        d0 = punch_tcp(reactor, S0, a0, [a1], start_delay=0.01, listener=l0, window=1.5, security=SEC0)
        d1 = punch_tcp(reactor, S1, a1, [a0], start_delay=0.01, listener=l1, window=1.5, security=mallory)
        f0 = yield self.assertFailure(d0, PunchFailed)
        f1 = yield self.assertFailure(d1, PunchFailed)
        self.assertIn(f"the peer's key is {MALLORY.fingerprint}, expected {BOB.fingerprint}", f0.reason)
        self.assertIn(f"the peer refused our key {MALLORY.fingerprint}", f1.reason)

    @defer.inlineCallbacks
    def test_role_1_refuses_role_0(self):
        """
        Role 0 is ready before role 1 checked its key; role 1 refuses it: role 0's
        connection is then lost saying so, and role 1's attempt fails naming it.
        """
        l0, l1 = self.listener(), self.listener()
        a0, a1 = ("127.0.0.1", _port(l0)), ("127.0.0.1", _port(l1))
        bob = ChannelSecurity(BOB, pinned(MALLORY.fingerprint))
        d0 = punch_tcp(reactor, S0, a0, [a1], start_delay=0.01, listener=l0, window=1.5, security=SEC0)
        d1 = punch_tcp(reactor, S1, a1, [a0], start_delay=0.01, listener=l1, window=1.5, security=bob)
        c0 = yield d0
        reason = yield c0.whenLost()
        self.assertIsInstance(reason, PeerRefusedUs)
        self.assertIn(f"the peer refused our key {ALICE.fingerprint}", str(reason))
        f1 = yield self.assertFailure(d1, PunchFailed)
        self.assertIn(f"the peer's key is {ALICE.fingerprint}, expected {MALLORY.fingerprint}", f1.reason)


# Run inside a private network namespace whose loopback drops every TCP RST,
# as a NAT that silently drops unsolicited SYNs would: role 0 connects first
# and its SYN to role 1's (bound, not listening) port gets no answer, so it
# stays in SYN_SENT until role 1's SYN arrives -- a true simultaneous open,
# with no listener anywhere.
_NETNS_SCRIPT = r"""
import json, sys
from twisted.internet import defer, reactor, task
from natbypass.identity import Identity
from natbypass.punch.candidates import reserve_tcp_port
from natbypass.punch.session import PunchSession
from natbypass.punch.tcp import punch_tcp
from natbypass.secure import ChannelSecurity
from natbypass.trust import pinned

KEY = b"k" * 32
ids = [Identity.generate() for _ in range(2)]
sec0, sec1 = ChannelSecurity(ids[0], pinned(ids[1].fingerprint)), ChannelSecurity(ids[1], pinned(ids[0].fingerprint))
holders = [reserve_tcp_port(None, "127.0.0.1", listen=False) for _ in range(2)]
a0, a1 = [("127.0.0.1", h.getsockname()[1]) for h in holders]

@defer.inlineCallbacks
def main(reactor):
    t0 = reactor.seconds()
    d0 = punch_tcp(reactor, PunchSession("s", KEY, 0), a0, [a1], start_delay=0.0, window=3, connect_timeout=2,
                   security=sec0)
    d1 = punch_tcp(reactor, PunchSession("s", KEY, 1), a1, [a0], start_delay=0.15, window=3, connect_timeout=2,
                   security=sec1)
    c0, c1 = yield defer.gatherResults([d0, d1])
    got = defer.Deferred()
    class R:
        def dataReceived(self, data): got.callback(data)
        def connectionLost(self, reason): pass
    c1.setReceiver(R())
    c0.send(b"crossed SYNs")
    data = yield got
    print(json.dumps({"data": data.decode(), "ms": (reactor.seconds() - t0) * 1000,
                      "ports": [c0.local_address.port, c0.remote_address.port]}))

task.react(main)
"""


class SimultaneousOpenNetnsTests(SynchronousTestCase):
    """A real TCP simultaneous open (no listener) in a private namespace."""

    def setUp(self) -> None:
        import os
        import shutil

        if os.geteuid() != 0:
            raise self.skipTest("needs root to create a network namespace")
        for tool in ("ip", "nft"):
            if shutil.which(tool) is None:
                raise self.skipTest(f"needs {tool!r} (iproute2 / nftables)")

    def test_crossing_syns(self) -> None:
        import json
        import os
        import subprocess
        import sys

        ns = f"nbp-simopen-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        self.addCleanup(subprocess.run, ["ip", "netns", "del", ns], check=False)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        rules = (
            "table inet t {\n chain out {\n  type filter hook output priority 0;\n"
            "  tcp flags & rst == rst counter drop\n }\n}\n"
        )
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True, check=True)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", _NETNS_SCRIPT],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=root,
            env={**os.environ, "PYTHONPATH": root},
        )
        self.assertEqual(proc.returncode, 0, proc.stderr)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        self.assertEqual(result["data"], "crossed SYNs")
        # Role 0's SYN waited for role 1's: it connected after role 1 started
        # (150 ms), not before, and well before a SYN retransmission (1 s).
        self.assertGreater(result["ms"], 150)
        self.assertLess(result["ms"], 1000)
        listing = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "list", "ruleset"], capture_output=True, text=True
        ).stdout
        self.assertRegex(listing, r"counter packets [1-9]")  # RSTs were really sent and dropped
