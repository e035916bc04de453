"""The network wing both sides use: byte streams, identities, the link, the fast path.

* ``transport`` — plain TCP and mutual-TLS byte streams under a protocol connection.
* ``security``  — certificates, the identity a TLS peer proves, key material errors.
* ``link``      — ``ServerLink``: one connection to one server, shared by every VM of a
  client process, and by a forwarding server for its peers.
* ``fastio``    — the C socket calls of the hot path (``_fastio.c``), checked against
  the codec before they are used.

The client (``remote_hw.client``) and the server (``remote_hw.server``) both import from
here; nothing here imports from either of them.
"""
