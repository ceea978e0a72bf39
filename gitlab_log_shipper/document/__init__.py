"""How a pipeline becomes a document: ``payload`` (the JSON), ``sections``, ``redact`` (masking), ``spool`` (the logs).
Pure: may use the shared modules only; knows no settings, no HTTP, no state.
"""
