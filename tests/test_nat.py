"""Tests for natbypass.nat: the one NAT vocabulary."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from natbypass.lab.traversal import TYPES, nat_of
from natbypass.nat import ClassicName, Filtering, Mapping, NatKind, NatSummary, classic_name, predictable_delta
from natbypass.stun.discovery import NATBehavior, TestResult

EI, AD, APD = Mapping.ENDPOINT_INDEPENDENT, Mapping.ADDRESS_DEPENDENT, Mapping.ADDRESS_AND_PORT_DEPENDENT
NONE, UNKNOWN = Mapping.NONE, Mapping.UNKNOWN


class KindTests(SynchronousTestCase):
    def test_lab_kinds(self) -> None:
        """Each lab preset's ground truth (the table the lab matrix and tests share) is its own row."""
        for name in TYPES:
            self.assertEqual(nat_of(name).kind(), NatKind(name))

    def test_firewall_without_nat_is_port_restricted(self) -> None:
        self.assertEqual(NatSummary(NONE, APD).kind(), NatKind.PORT_RESTRICTED)

    def test_tcp_mapping_measured_apart(self) -> None:
        s = NatSummary(EI, APD, tcp_mapping=APD)
        self.assertEqual((s.kind("udp"), s.kind("tcp")), (NatKind.PORT_RESTRICTED, NatKind.SYMMETRIC_RANDOM))

    def test_bad_behaviour_name(self) -> None:
        self.assertRaises(ValueError, NatSummary, "eim", APD)

    def test_predictable_delta(self) -> None:
        self.assertEqual(predictable_delta([4000, 4001, 4001, 4002]), 1)
        self.assertEqual(predictable_delta([4000, 4002, 4004]), 2)
        self.assertIsNone(predictable_delta([4000, 4001]))
        self.assertIsNone(predictable_delta([4000, 4001, 4003]))
        self.assertIsNone(predictable_delta([4000, 31000, 62000]))

    def test_summary_of_discovery(self) -> None:
        """NATBehavior.summary: the port step from the mapped ports of the tests."""

        def behaviour(*ports: int | None) -> NATBehavior:
            tests = tuple(
                TestResult(f"t{i}", ("198.18.0.2", 3478), p is not None, ("198.18.0.5", p) if p else None)
                for i, p in enumerate(ports)
            )
            return NATBehavior(
                ("198.18.0.2", 3478),
                True,
                APD,
                Filtering.ADDRESS_AND_PORT_DEPENDENT,
                ClassicName.SYMMETRIC,
                None,
                None,
                False,
                tests=tests,
            )

        s = behaviour(5000, 5001, None, 5002).summary()
        self.assertEqual((s.kind(), s.port_delta, s.udp_blocked), (NatKind.SYMMETRIC_PREDICTABLE, 1, False))
        # Other flows took ports between the Binding and the two back-to-back
        # mapping tests (seen in the lab: TCP tests run alongside).
        s = behaviour(20003, None, None, 20006, 20007).summary()
        self.assertEqual((s.kind(), s.port_delta), (NatKind.SYMMETRIC_PREDICTABLE, 1))
        self.assertIsNone(behaviour(20003, 41234, 3311).summary().port_delta)


class ClassicNameTests(SynchronousTestCase):
    def test_names(self) -> None:
        F = Filtering
        self.assertEqual(classic_name(False, EI, F.ENDPOINT_INDEPENDENT), ClassicName.UDP_BLOCKED)
        self.assertEqual(classic_name(True, NONE, F.NONE), ClassicName.OPEN)
        self.assertEqual(classic_name(True, NONE, F.ADDRESS_DEPENDENT), ClassicName.SYMMETRIC_FIREWALL)
        self.assertEqual(classic_name(True, EI, F.ENDPOINT_INDEPENDENT), ClassicName.FULL_CONE)
        self.assertEqual(classic_name(True, EI, F.ADDRESS_DEPENDENT), ClassicName.RESTRICTED_CONE)
        self.assertEqual(classic_name(True, EI, F.ADDRESS_AND_PORT_DEPENDENT), ClassicName.PORT_RESTRICTED_CONE)
        self.assertEqual(classic_name(True, AD, F.ENDPOINT_INDEPENDENT), ClassicName.SYMMETRIC)
        self.assertEqual(classic_name(True, UNKNOWN, F.UNKNOWN), ClassicName.UNKNOWN)
        self.assertEqual(NatSummary(EI, F.ADDRESS_DEPENDENT, udp_blocked=True).classic, ClassicName.UDP_BLOCKED)

    def test_values_are_the_wire_spellings(self) -> None:
        """The enums compare equal to, and serialise as, their strings."""
        import json

        self.assertEqual(Mapping("endpoint-independent"), "endpoint-independent")
        self.assertEqual(json.dumps([Filtering.NONE, ClassicName.FULL_CONE]), '["none", "full-cone"]')

    @given(
        st.sampled_from(list(Mapping)),
        st.sampled_from(list(Filtering)),
        st.sampled_from([None, *Mapping]),
        st.sampled_from([None, 1, -2, 64]),
    )
    def test_strings_and_members_give_one_summary(self, m, f, t, d) -> None:
        self.assertEqual(
            NatSummary(m.value, f.value, None, d, t.value if t else None),
            NatSummary(m, f, None, d, t),
        )

    def test_bad_values(self) -> None:
        self.assertRaises(ValueError, NatSummary, EI, APD, port_delta=65)
        self.assertRaises(ValueError, NatSummary, EI, APD, port_delta=0)
        self.assertRaises(ValueError, NatSummary, EI, APD, port_delta=True)
        self.assertRaises(ValueError, NatSummary, EI, APD, tcp_mapping="sometimes")
        self.assertRaises(ValueError, NatSummary, EI, APD, port_preserving="yes")
