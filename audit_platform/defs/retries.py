"""The one retry policy for steps that meet transient failures (a server restarting, a lock).

Every capture, enrichment and indexing step is idempotent, so a retry simply does the work again;
exponential backoff with jitter keeps retries of many runs from arriving together.
"""

import dagster as dg

transient_retry_policy = dg.RetryPolicy(
    max_retries=4, delay=5, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)
