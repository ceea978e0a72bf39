"""What the shipper remembers: ``store`` (SQLite), its ``latency`` histogram, the ``lock``, ``read_only`` (dry run).
May use the shared modules only; knows no settings, no HTTP, no GitLab.
"""
