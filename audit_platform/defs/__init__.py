"""The Dagster code location: wiring only; the work lives in the plain-Python core.

One deployment serves one environment (``AUDIT_ENV``) and only the sources its
``resources/environments/<env>.yaml`` names: another environment's slots, paths and indices
cannot be reached from here.
"""

from __future__ import annotations

import dagster as dg

from audit_platform.defs.capture.assets import capture_job, staged_asset_specs
from audit_platform.defs.capture.sensors import capture_sensor
from audit_platform.environment import load_environment
from audit_platform.settings import Settings


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    settings = settings or Settings()
    environment = load_environment(settings.resources_dir, settings.env)
    assets, jobs, sensors = [], [], []
    for source, config in sorted(environment.sources.items()):
        assets.extend(staged_asset_specs(source))
        job = capture_job(source, config, environment.capture_batch_changes)
        jobs.append(job)
        sensors.append(capture_sensor(source, config, job, environment.capture_interval_seconds))
    return dg.Definitions(assets=assets, jobs=jobs, sensors=sensors)


defs = build_definitions()
