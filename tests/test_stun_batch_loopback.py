"""
natbypass.stun.batch on real loopback sockets: recvmmsg/sendmmsg through
ctypes (the module is nothing but those two system calls, so there is no
fake to test it on).  Skipped where the calls are not available (not Linux).
"""

from __future__ import annotations

import errno
import os
import socket

from twisted.trial.unittest import SynchronousTestCase

from natbypass.stun import batch
from natbypass.stun.batch import RECEIVE_SIZE, SEND_SIZE, SLOTS, DatagramBatch

HOST = "127.0.0.1"


class BatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        if not batch.available():
            raise self.skipTest("recvmmsg/sendmmsg are not available on this system")
        self.server = self.udp()
        self.vectors = DatagramBatch(self.server.fileno())
        self.addCleanup(self.vectors.close)

    def udp(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((HOST, 0))
        s.setblocking(False)
        return s

    def clients(self, n: int) -> list[socket.socket]:
        return [self.udp() for _ in range(n)]

    def test_nothing_waiting(self) -> None:
        self.assertEqual(self.vectors.receive(), 0)

    def test_receive_datagrams_and_sources(self) -> None:
        clients = self.clients(5)
        sent = []
        for i, c in enumerate(clients):
            data = os.urandom(i * 7)  # 0 to 28 bytes, an empty datagram first
            c.sendto(data, self.server.getsockname())
            sent.append((data, c.getsockname()))
        self.assertEqual(self.vectors.receive(), 5)
        got = [(self.vectors.data(i), self.vectors.source(i)) for i in range(5)]
        self.assertEqual(got, sent)
        self.assertEqual([self.vectors.length(i) for i in range(5)], [len(d) for d, _ in sent])
        self.assertEqual(self.vectors.receive(), 0)

    def test_at_most_slots_per_call(self) -> None:
        (client,) = self.clients(1)
        for i in range(SLOTS + 3):
            client.sendto(i.to_bytes(2, "big"), self.server.getsockname())
        self.assertEqual(self.vectors.receive(), SLOTS)
        self.assertEqual([self.vectors.data(i) for i in range(SLOTS)], [i.to_bytes(2, "big") for i in range(SLOTS)])
        self.assertEqual(self.vectors.receive(), 3)
        self.assertEqual(self.vectors.data(2), (SLOTS + 2).to_bytes(2, "big"))

    def test_largest_datagram_whole(self) -> None:
        """A slot holds any UDP datagram: a 65,507-byte one arrives whole, and the next slot is intact."""
        (client,) = self.clients(1)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        big = os.urandom(65507)
        client.sendto(big, self.server.getsockname())
        client.sendto(b"after", self.server.getsockname())
        self.assertLess(len(big), RECEIVE_SIZE)
        self.assertEqual(self.vectors.receive(), 2)
        self.assertEqual(self.vectors.data(0), big)
        self.assertEqual(self.vectors.data(1), b"after")

    def test_responses_go_to_their_sources(self) -> None:
        """Datagram i answered from send slot k <= i (slots skipped in between) reaches datagram i's source."""
        clients = self.clients(6)
        for c in clients:
            c.sendto(b"ping", self.server.getsockname())
        self.assertEqual(self.vectors.receive(), 6)
        answered = [1, 2, 4, 5]  # 0 and 3 not answered: the others move up
        for k, i in enumerate(answered):
            self.vectors.put(k, b"pong %d" % i, i)
        self.assertEqual(self.vectors.send(len(answered)), 0)
        for i, c in enumerate(clients):
            if i in answered:
                self.assertEqual(c.recvfrom(100), (b"pong %d" % i, self.server.getsockname()))
            else:
                self.assertRaises(BlockingIOError, c.recvfrom, 100)

    def test_refused_send_skipped_and_counted(self) -> None:
        """A response the kernel refuses (port 0) is counted; the ones after it are still sent."""
        clients = self.clients(3)
        for c in clients:
            c.sendto(b"ping", self.server.getsockname())
        self.assertEqual(self.vectors.receive(), 3)
        at = self.vectors.name_offsets[1]
        self.vectors.memory[at + 2 : at + 4] = b"\x00\x00"  # slot 1's source port: 0, which sendmmsg refuses
        for i in range(3):
            self.vectors.put(i, b"pong", i)
        self.assertEqual(self.vectors.send(3), 1)
        self.assertEqual(clients[0].recv(100), b"pong")
        self.assertEqual(clients[2].recv(100), b"pong")

    def test_put_bounded(self) -> None:
        self.assertRaises(ValueError, self.vectors.put, 0, bytes(SEND_SIZE + 1), 0)

    def test_receive_error_raised(self) -> None:
        """Errors other than 'nothing to read' are raised as OSError with the errno."""
        closed = DatagramBatch(os.open(os.devnull, os.O_RDONLY))
        self.addCleanup(closed.close)
        os.close(closed.fileno)
        e = self.assertRaises(OSError, closed.receive)
        self.assertEqual(e.errno, errno.EBADF)
