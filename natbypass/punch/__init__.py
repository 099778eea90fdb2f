"""
The traversal engines: UDP hole punching and TCP simultaneous open.

C{packet} (punch packet codec), C{mux} (one socket for STUN and punching),
C{session} (what a mediated session gives both engines), C{udp} and
C{tcp} (the engines and the connections they make), C{select} (which
protocol first, and the happy-eyeballs race), C{candidates} (local
addresses and ports).  See each module's docstring.
"""
