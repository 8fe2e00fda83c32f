"""Elasticsearch wiring: the index template, indexed hours, reconciliation, retention."""
