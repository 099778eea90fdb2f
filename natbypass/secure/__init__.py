"""
Secure channels over punched paths, authenticated by pinned identity keys.

  - L{natbypass.secure.tls}: TLS 1.3 (pyOpenSSL) over an adopted TCP connection;
  - L{natbypass.secure.quic}: QUIC (aioquic or qh3) over the punched UDP 5-tuple.

Both authenticate each side by the fingerprint of its L{natbypass.identity}
key, never by a CA or a host name; see C{docs/security.md}.
"""
