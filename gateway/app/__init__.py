"""Entry points and wiring: settings, the pipeline and runtime, the CLI, demo and simulation.

The only part that sees everything (api, simulators, every stage); nothing imports it but itself.
"""
