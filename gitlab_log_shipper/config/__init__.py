"""Settings, read once: ``settings`` (environment and env file → a frozen Config), ``envfile``, ``headers``.
May use the shared modules and ``document.redact``'s parser (for LOG_REDACT_PATTERNS); nothing else of the package.
"""
