"""Outbound delivery of queued mail: the worker, routes (MX, smarthost) and DSNs."""
