"""Where pipelines come from: ``rest`` (python-gitlab, its only importer), ``graphql``, ``throttle``, ``download``.
May use the shared modules and config; never document, delivery, state, the shipper or the service.
"""
