"""Running it: daemon, supervision, notify, health, metrics, stats, check, status, progress, preview, logsetup.
May use every layer below and the shipper; only the CLI imports it.
"""
