"""Stand-ins for tests and the demo: GitLab (``gitlab``, ``graphql`` over a ``world`` with ``logs``) and a ``receiver``.
May use the standard library, click and graphql-core (lazily, the ``sim`` extra); nothing of the shipper.

- :mod:`.world` — the state of a simulated GitLab (projects, pipelines, jobs, logs) and its mutations;
- :mod:`.logs` — deterministic, realistic job logs of any size, streamed in bounded memory;
- :mod:`.gitlab` — GitLab's REST API over HTTP, answering from a World, with fault injection;
- :mod:`.graphql` — GitLab's GraphQL API (``/api/graphql``) for the same simulator and World; without graphql-core
  the simulator answers ``/api/graphql`` with 404 and all else works;
- :mod:`.receiver` — the log-analysis API the shipper posts to;
- ``python -m gitlab_log_shipper.sim`` — run either as a standalone server.
"""
