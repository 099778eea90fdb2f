"""
NATbypass: direct connections between programs behind NATs.

A mediator (STUN responder and signalling service) introduces peers; the
peers then open a direct UDP or TCP path by hole punching.  Application
data never passes through the mediator.
"""

__version__ = "0.1.0"
