"""
docs/protocol.md must not drift from the code: every example line in it
(C{C: ...} from a client, C{S: ...} from the mediator) decodes in its
direction, and its timing example adds up.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from natbypass.signaling import wire
from natbypass.signaling.server import Limits, punch_delays

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "protocol.md")


def examples() -> list[tuple[str, bytes]]:
    with open(DOC, encoding="utf-8") as f:
        return [(line[0], line[3:].strip().encode()) for line in f.read().splitlines() if line[:3] in ("C: ", "S: ")]


class DocumentExampleTests(SynchronousTestCase):
    def test_examples_decode(self) -> None:
        found = examples()
        self.assertGreater(len(found), 15)
        for side, line in found:
            decoder = wire.decode_from_client if side == "C" else wire.decode_from_server
            try:
                msg = decoder(line)
            except wire.WireError as e:
                self.fail(f"docs/protocol.md example does not decode ({e}): {line.decode()}")
            # and the codec writes it back the same way (modulo key order and nulls)
            self.assertEqual(decoder(wire.encode(msg)), msg)

    def test_every_op_has_an_example(self) -> None:
        ops = {
            (side, decoder_op)
            for side, line in examples()
            for decoder_op in [line.split(b'"op":"')[1].split(b'"')[0].decode()]
        }
        self.assertEqual({op for side, op in ops if side == "C"}, set(wire.CLIENT_MESSAGES))
        self.assertEqual({op for side, op in ops if side == "S"}, set(wire.SERVER_MESSAGES))

    def test_error_table_complete(self) -> None:
        with open(DOC, encoding="utf-8") as f:
            doc = f.read()
        for name, code in wire.ERROR_CODES.items():
            self.assertIn(f"| {code} | `{name}` |", doc)

    def test_register_example_verifies(self) -> None:
        """The documented register is a real proof over the documented greeting's nonce."""
        from natbypass.identity import load_public_key, verify_registration

        greeting = next(
            wire.decode_from_server(line) for side, line in examples() if side == "S" and b'"nonce"' in line
        )
        register = next(wire.decode_from_client(line) for side, line in examples() if b'"op":"register"' in line)
        registered = next(wire.decode_from_server(line) for side, line in examples() if b'"registered"' in line)
        fp = verify_registration(load_public_key(register.key), register.sig, greeting.nonce, register.id)
        self.assertEqual(str(fp), registered.fingerprint)

    def test_timing_example(self) -> None:
        sessions = [
            wire.decode_from_server(line) for side, line in examples() if side == "S" and b'"op":"session"' in line
        ]
        a, b = (s.session for s in sessions)
        da, db = punch_delays(a.rtt_ms / 1000, b.rtt_ms / 1000, Limits().punch_margin)
        self.assertEqual((a.start_in_ms, b.start_in_ms), (round(da * 1000), round(db * 1000)))
        self.assertEqual((a.id, a.key), (b.id, b.key))


class LimitsDocumentedTests(SynchronousTestCase):
    def test_every_signalling_option_documented(self) -> None:
        """Each signalling option of `twistd natbypass-mediator` is in docs/protocol.md."""
        from natbypass.signaling.service import SIGNAL_OPT_PARAMETERS

        with open(DOC, encoding="utf-8") as f:
            doc = f.read()
        missing = [
            row[0]
            for row in SIGNAL_OPT_PARAMETERS
            if f"--{row[0]}" not in doc and row[0] not in ("status-interval", "gc-freeze-interval")
        ]
        self.assertEqual(missing, [])
        for field in ("lines_per_turn", "max_rate_limited", "max_offers_per_pair", "close_linger"):
            self.assertTrue(hasattr(Limits(), field))
            self.assertIn(f"`{field}`", doc)
