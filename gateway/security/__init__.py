"""Security: scoped admin keys, customer app tokens, rate limits, idempotency keys, log redaction.

Imports storage and clock only.
"""
