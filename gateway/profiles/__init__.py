"""Profiles: customers, their identifiers and consents, the identity index, privacy (export, erasure),
and the service the API calls. Imports the stages below it; never api, simulators or gateway.app.
"""
