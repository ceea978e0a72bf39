"""Loopback stand-ins for the shipper's two neighbours, for integration tests and demos.

- :mod:`.world` — the state of a simulated GitLab (projects, pipelines, jobs, logs) and its mutations;
- :mod:`.logs` — deterministic, realistic job logs of any size, streamed in bounded memory;
- :mod:`.gitlab` — GitLab's REST API over HTTP, answering from a World, with fault injection;
- :mod:`.receiver` — the log-analysis API the shipper posts to;
- ``python -m gitlab_log_shipper.sim`` — run either as a standalone server.

Standard library only: these run wherever the shipper runs.
"""
