"""
The NAT lab's public API, as used by tests, benchmarks and the command line.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ILab(Interface):
    """A running NAT lab: namespaces wired into a small internet with NATs."""

    lab_id = Attribute("Unique id of this lab (e.g. 'nbl3fa2c1'); every namespace name starts with it.")
    spec = Attribute("The LabSpec the lab was built from.")
    mediator_addresses = Attribute("The mediator host's two public addresses (primary, alternate) for RFC 5780.")

    mediator_addresses6 = Attribute("The mediator's two IPv6 addresses, in a lab with IPv6 (LabError otherwise).")

    def public_address(site):
        """The public IPv4 address of site C{site} (its NAT's, or its own for open/firewall sites); None: IPv6 only."""

    def address6(node):
        """The IPv6 address of node C{node} (public, never NATed); LabError when it has none."""

    def address(node):
        """The address of node C{node} on its own interface (private for hosts behind a NAT)."""

    def netns(node):
        """The network namespace name of node C{node}."""

    def exec(node, argv, timeout=60, check=False, input=None):
        """Run C{argv} in C{node}'s namespace and wait; returns a CompletedProcess with text output."""

    def spawn(node, argv, **popen_kwargs):
        """Start C{argv} in C{node}'s namespace; returns a Popen, killed at C{stop()}."""

    def stop():
        """Kill everything running in the lab and delete its namespaces; idempotent."""
