"""What the shipper remembers: the SQLite store of cursors, shipments, outbox and totals (``store``), the latency
histogram it keeps (``latency``), the one-daemon lock (``lock``) and the dry run's write-nothing store (``read_only``).

May use the shared modules (errors, timeutil) only; knows no settings, no HTTP, no GitLab.
"""
