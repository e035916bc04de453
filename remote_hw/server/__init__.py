"""The server: software devices served to remote VMs, one job per module.

* :mod:`.listener` — :class:`~.listener.Server`: accepts connections (plain or mutual
  TLS) and runs a session thread for each.
* :mod:`.session` — :class:`~.session.ClientSession`: one connection's handshake,
  message handlers and the per-access hot path.
* :mod:`.router` — a device held here or elsewhere; the table of local client ids.
* :mod:`.policy` — who may be a server peer, ``--allow`` lists.
* :mod:`.controller` — device registry, per-session instances, feedback.
* :mod:`.limits`, :mod:`.watchdog`, :mod:`.outbox` (and :mod:`remote_hw.net.logsafe`) —
  what one peer may cost: connection limits and quotas, the handshake and idle deadlines, the
  bounded queue that keeps a slow client from stalling others, safe logging.
* :mod:`.forward`, :mod:`.directory` — links to other servers, which server holds what.
* :mod:`.fuse` — the FUSE view of every device's far side.
"""
