"""Telemetry: readings stored (registry, rollups, dead letters) and device rules turned into alarms.

Imports devices (pure parsing and rules), the engine (prompts), profiles and storage.
"""
