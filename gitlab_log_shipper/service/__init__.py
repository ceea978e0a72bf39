"""Running it: the daemon loop and signals (``daemon``), what it tells its supervisors (``supervision``, ``notify``,
``health``, ``metrics``, ``stats``), the commands' reports (``check``, ``status``, ``progress``, ``preview``) and the
application log (``logsetup``).

May use every layer below and the shipper; only the CLI uses it. Nothing below imports from here.
"""
