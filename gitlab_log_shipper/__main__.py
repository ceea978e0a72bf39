"""``python -m gitlab_log_shipper`` = the ``gitlab-log-shipper`` command."""

from .cli import main

main()
