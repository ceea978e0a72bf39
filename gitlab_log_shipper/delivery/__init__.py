"""Where documents go and how they survive: ``poster`` (POST, retries), ``outbox``, ``request_log``, ``files``.
May use the shared modules, config, document and state; knows nothing of GitLab, the shipper or the service.
"""
