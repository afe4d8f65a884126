"""Campaigns: the file format, conditions and the index by trigger.

Owns what a campaign is, not what it decides. Imports nothing else of the gateway but storage models.
"""
