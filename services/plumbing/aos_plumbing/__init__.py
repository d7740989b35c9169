"""Plumbing shared by the four services: bus, settings, HTTP health/metrics, runner.

Nothing here knows about planning, budgets, skills or traces.
"""
