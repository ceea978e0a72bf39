"""Where documents go and how they survive: the POST with its retries (``poster``), the outbox and dead letters
(``outbox``), ``api-requests.log`` (``request_log``) and the predecessor's file layout (``files``).

May use the shared modules, config, document and state; knows nothing of GitLab, the shipper or the service.
"""
