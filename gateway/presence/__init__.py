"""Presence: who is in which zone, from sightings (Kalman RSSI, HMM zones, visits).

Owns the tracker and the visit records. Imports beacons (types), gateway.storage and gateway.clock only.
"""
