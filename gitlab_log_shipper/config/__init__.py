"""Settings, read once: the environment and the env file into a frozen :class:`settings.Config` (``settings``), the
env-file parser shared with the systemd unit (``envfile``) and ``API_POST_HEADERS`` (``headers``).

May use the shared modules (errors, security, timeutil) and ``document.redact``'s parser, which checks
``LOG_REDACT_PATTERNS``; never GitLab, delivery, state, the shipper or the service.
"""
