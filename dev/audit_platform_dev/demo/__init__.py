"""The demo: a small shop service that adopts the context SDK, traffic that acts like its users
and jobs, and the one command that runs it with the whole platform (``audit-platform demo``)."""
