"""The engine: an event and the campaigns it triggers in, decisions, notifications out.

Owns facts, limit checks, arbitration, schedules, explanations and figures. Imports campaigns and storage.
"""
