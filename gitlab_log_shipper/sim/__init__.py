"""Loopback stand-ins for the shipper's two neighbours, for integration tests and demos.

- :mod:`.world` — the state of a simulated GitLab (projects, pipelines, jobs, logs) and its mutations;
- :mod:`.logs` — deterministic, realistic job logs of any size, streamed in bounded memory;
- :mod:`.gitlab` — GitLab's REST API over HTTP, answering from a World, with fault injection;
- :mod:`.graphql` — GitLab's GraphQL API (``/api/graphql``) for the same simulator and World;
- :mod:`.receiver` — the log-analysis API the shipper posts to;
- ``python -m gitlab_log_shipper.sim`` — run either as a standalone server.

May use the standard library, click (its command line) and graphql-core (the ``sim`` extra, for the GraphQL API,
imported lazily: without it ``/api/graphql`` answers 404); nothing of the shipper, which it stands in for.
"""
