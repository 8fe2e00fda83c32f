"""The one retry policy for steps that meet transient failures (a server restarting, a lock).

Every capture, enrichment and indexing step is idempotent, so a retry simply does the work again;
exponential backoff with jitter keeps retries of many runs from arriving together. What a step
cannot finish after its retries is not lost: the pending ledger keeps it for the next run.
"""

import dagster as dg

from audit_platform.environment import EnvironmentConfig


def transient_retry_policy(environment: EnvironmentConfig) -> dg.RetryPolicy:
    return dg.RetryPolicy(
        max_retries=environment.step_retries,
        delay=environment.step_retry_delay_seconds,
        backoff=dg.Backoff.EXPONENTIAL,
        jitter=dg.Jitter.PLUS_MINUS,
    )
