"""gitlab-log-shipper: ships every finished GitLab CI pipeline, with all job logs, to a log API or files."""

__version__ = "0.2.0"
