"""Capture wiring: per source, a staged-data asset, a capture job, and a sensor that runs it."""
