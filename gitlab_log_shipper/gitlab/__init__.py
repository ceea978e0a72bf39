"""Where pipelines come from: reading GitLab (REST through python-gitlab in ``rest``, GraphQL change detection in
``graphql``, the rate-limit ``throttle``, bounded job-log ``download``s).

May use the shared modules (errors, security, counters, timeutil) and config; never document, delivery, state,
the shipper or the service. ``rest`` is the only module of the package that imports python-gitlab.
"""
