"""Delivery: the outbox and its dispatcher, the live-stream hub, the webhook and Web Push channels.

Reads committed notifications and sends them; never decides. Imports storage, clock and metrics only.
"""
