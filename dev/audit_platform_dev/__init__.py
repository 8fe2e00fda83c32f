"""Development tooling of audit-platform, kept out of the shipped package: the local real
servers (``stack``: PostgreSQL from Debian's packages, Elasticsearch from Maven Central, an S3
stand-in, a local Dagster deployment) and the demo shop with its traffic (``demo``).

They install system packages and create system accounts, which a production image must never
carry. ``audit-platform stack ...`` and ``audit-platform demo`` exist when this package is
installed (``make install`` does); a production install has neither.
"""
