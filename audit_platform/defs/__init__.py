"""The Dagster code location: wiring only; the work lives in the plain-Python core.

Each domain gets a folder here (capture, enrich, index, retention), each split into assets,
sensors, schedules and resources. The pipeline's assets arrive with those domains.
"""

from __future__ import annotations

import dagster as dg

defs = dg.Definitions()
