"""
The traversal engines: UDP hole punching and TCP simultaneous open.

``packet`` (punch packet codec), ``mux`` (one socket for STUN and punching),
``session`` (what a mediated session gives both engines), ``udp`` and
``tcp`` (the engines and the connections they make), ``select`` (which
protocol first, and the happy-eyeballs race), ``candidates`` (local
addresses and ports).  See each module's docstring.
"""
