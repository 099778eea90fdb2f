"""
Batched UDP I/O for the STUN responder: Linux's C{recvmmsg} and
C{sendmmsg} through C{ctypes}, on preallocated vectors.

Why: a bare Binding costs the responder two system calls (one C{recvfrom},
one C{sendto}), and each pays the kernel's entry and exit, plus a Python
call, a tuple and a string for the source address.  One C{recvmmsg} reads up
to L{SLOTS} datagrams and one C{sendmmsg} sends up to as many responses
(docs/performance.md, "STUN").  Python's C{socket} module has neither call,
and no maintained binding exists on PyPI; C{ctypes} is the standard
library's, and the two calls have had the same ABI since Linux 2.6.33 /
3.0.

Layout: one anonymous C{mmap} holds everything the kernel reads or writes
(the two header vectors, their C{iovec}s, the source addresses and the data
slots), so it is allocated once, never moves, and costs memory only for the
pages touched (a slot holds a whole 64 KiB datagram, but a 28-byte request
touches one page).  Header layouts come from C{ctypes.Structure}s, so the
offsets are the platform's.

The caller reads slot C{i} of a batch with L{DatagramBatch.length},
L{DatagramBatch.data_offset} and L{DatagramBatch.name_offset} (or the
lists and views they read, in a hot loop), writes responses into the send
slots, and calls L{DatagramBatch.send}.  IPv4 only: the address slots are
C{sockaddr_in}s.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import socket
import sys

#: Datagrams read (and responses sent) per system call.
SLOTS = 32
#: Bytes of one receive slot: any UDP datagram fits whole.
RECEIVE_SIZE = 65536
#: Bytes of one send slot: a fast-path response is at most about 200.
SEND_SIZE = 512
#: sockaddr_in, and its slot (kept 16-byte aligned).
_NAME_SIZE = 16
_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0x40)


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


_HDR = ctypes.sizeof(_MMsgHdr)
_IOV = ctypes.sizeof(_IOVec)
_IOV_LEN_SIZE = ctypes.sizeof(ctypes.c_size_t)


def _libc_calls():
    """(recvmmsg, sendmmsg) from the C library, or None where there are none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        recv, send = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    recv.restype = ctypes.c_int
    send.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    send.restype = ctypes.c_int
    return recv, send


_CALLS = _libc_calls()


def available() -> bool:
    """True where C{recvmmsg}/C{sendmmsg} can be called (Linux with a C library that has them)."""
    return _CALLS is not None


class DatagramBatch:
    """
    The vectors for batched reads from, and writes to, one IPv4 UDP socket
    (by its descriptor; the socket stays the caller's and must be
    non-blocking).  Send slot C{k}'s destination is address slot C{k}: the
    caller answering datagram C{i} into send slot C{k <= i} first copies
    address slot C{i} to C{k} (L{move_name}), which is free by then.
    """

    def __init__(self, fileno: int, slots: int = SLOTS) -> None:
        if _CALLS is None:
            raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg are not available here")
        self._recvmmsg, self._sendmmsg = _CALLS
        self.fileno = fileno
        self.slots = slots
        hdrs = 2 * slots * _HDR
        iovs = 2 * slots * _IOV
        names = slots * _NAME_SIZE
        self._recv_hdrs, self._send_hdrs = 0, slots * _HDR
        recv_iovs, send_iovs = hdrs, hdrs + slots * _IOV
        names_at = hdrs + iovs
        send_at = names_at + names
        send_at += -send_at % 64
        recv_at = send_at + slots * SEND_SIZE
        recv_at += -recv_at % mmap.PAGESIZE
        self.memory = mmap.mmap(-1, recv_at + slots * RECEIVE_SIZE)
        self._anchor = ctypes.c_char.from_buffer(self.memory)
        base = ctypes.addressof(self._anchor)
        self._base = base
        #: Offsets in L{memory} of slot i's received data, its source address, and send slot i.
        self.data_offsets = [recv_at + i * RECEIVE_SIZE for i in range(slots)]
        self.name_offsets = [names_at + i * _NAME_SIZE for i in range(slots)]
        self.send_offsets = [send_at + i * SEND_SIZE for i in range(slots)]
        for i in range(slots):
            for hdr_at, iov_at, buf_at, size in (
                (self._recv_hdrs, recv_iovs, self.data_offsets[i], RECEIVE_SIZE),
                (self._send_hdrs, send_iovs, self.send_offsets[i], 0),
            ):
                iov = _IOVec.from_buffer(self.memory, iov_at + i * _IOV)
                iov.iov_base, iov.iov_len = base + buf_at, size
                hdr = _MMsgHdr.from_buffer(self.memory, hdr_at + i * _HDR)
                hdr.msg_hdr.msg_name = base + self.name_offsets[i]
                hdr.msg_hdr.msg_namelen = _NAME_SIZE
                hdr.msg_hdr.msg_iov = base + iov_at + i * _IOV
                hdr.msg_hdr.msg_iovlen = 1
                del iov, hdr  # no exported buffer may outlive close()
        view = memoryview(self.memory)
        #: C{lengths[length_index[i]]}: the size of the datagram in slot i after L{receive}.
        self.lengths = view.cast("I")
        self.length_index = [(self._recv_hdrs + i * _HDR + _MMsgHdr.msg_len.offset) // 4 for i in range(slots)]
        #: C{send_lengths[send_length_index[k]] = n}: send slot k holds an n-byte response.
        self.send_lengths = view.cast("N")
        self.send_length_index = [(send_iovs + k * _IOV + _IOVec.iov_len.offset) // _IOV_LEN_SIZE
                                  for k in range(slots)]  # fmt: skip
        #: Per receive slot i: (i, its C{lengths} index, the offsets in L{memory} of its source's port and
        #: IPv4 address (6 bytes, network order), the offset of its data): what a read loop needs, in one tuple.
        self.received_slots = [
            (i, self.length_index[i], self.name_offsets[i] + 2, self.name_offsets[i] + 8, self.data_offsets[i])
            for i in range(slots)
        ]
        #: Per send slot k: (its offset in L{memory}, its C{send_lengths} index).
        self.send_slots = [(self.send_offsets[k], self.send_length_index[k]) for k in range(slots)]
        self._namelen_index = [(self._recv_hdrs + i * _HDR + _MsgHdr.msg_namelen.offset) // 4 for i in range(slots)]
        self._view = view

    def receive(self) -> int:
        """
        Read up to L{slots} datagrams without waiting: how many (0 when none
        is waiting).  Raises C{OSError} for errors other than C{EAGAIN} and
        C{EINTR} (Twisted's read loop handles C{ECONNREFUSED}).
        """
        lengths, index = self.lengths, self._namelen_index
        for i in index:
            lengths[i] = _NAME_SIZE  # the kernel wrote the last source's size there
        got = self._recvmmsg(self.fileno, self._base + self._recv_hdrs, self.slots, _MSG_DONTWAIT, None)
        if got >= 0:
            return got
        code = ctypes.get_errno()
        if code in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
            return 0
        raise OSError(code, f"recvmmsg: {errno.errorcode.get(code, code)}")

    def send(self, count: int) -> int:
        """
        Send the first C{count} send slots, each to its address slot: how
        many the kernel refused (each is skipped, the rest still sent).
        """
        done = failed = 0
        while done < count:
            sent = self._sendmmsg(self.fileno, self._base + self._send_hdrs + done * _HDR, count - done, 0)
            if sent <= 0:
                failed += 1
                done += 1
            else:
                done += sent
        return failed

    def length(self, i: int) -> int:
        """Bytes of the datagram in slot C{i}."""
        return self.lengths[self.length_index[i]]

    def data(self, i: int) -> bytes:
        """The datagram in slot C{i}."""
        at = self.data_offsets[i]
        return self.memory[at : at + self.length(i)]

    def source(self, i: int) -> tuple[str, int]:
        """The source (host, port) of the datagram in slot C{i}."""
        at = self.name_offsets[i]
        raw = self.memory[at + 2 : at + 8]
        return socket.inet_ntoa(raw[2:]), int.from_bytes(raw[:2], "big")

    def put(self, k: int, response: bytes, i: int) -> None:
        """Queue C{response} in send slot C{k} to the source of datagram C{i} (C{k <= i})."""
        if len(response) > SEND_SIZE:
            raise ValueError(f"a {len(response)}-byte response is over the {SEND_SIZE}-byte send slot")
        at = self.send_offsets[k]
        self.memory[at : at + len(response)] = response
        self.send_lengths[self.send_length_index[k]] = len(response)
        if k != i:
            self.move_name(i, k)

    def move_name(self, i: int, k: int) -> None:
        """Copy address slot C{i} into slot C{k}."""
        src, dst = self.name_offsets[i], self.name_offsets[k]
        self.memory[dst : dst + _NAME_SIZE] = self.memory[src : src + _NAME_SIZE]

    def close(self) -> None:
        """Free the memory (the socket is the caller's)."""
        self.lengths.release()
        self.send_lengths.release()
        self._view.release()
        del self._anchor
        self.memory.close()
