"""How a pipeline becomes a document: the JSON (``payload``), job sections and failure details (``sections``),
masking secrets in logs (``redact``) and the capped spool a log streams into (``spool``).

Pure: may use the shared modules (errors, security, timeutil) only; knows no settings, no HTTP, no state.
"""
