# One image for the code location (Dagster's gRPC server; K8sRunLauncher starts each run from
# the same image) and the Audit API. Built from this checkout: `docker build -t audit-platform .`
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY audit_platform ./audit_platform
COPY sdk ./sdk
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
# A fixed, unprivileged user: the chart runs every container as it (runAsNonRoot).
RUN useradd --system --uid 10001 --gid 0 --home-dir /app audit
WORKDIR /app
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# Policies, templates and SQL are read at run time from here, not from the installed package.
COPY resources ./resources
COPY workspace.yaml ./
ENV AUDIT_RESOURCES_DIR=/app/resources \
    PYTHONUNBUFFERED=1 \
    DAGSTER_HOME=/tmp/dagster_home
USER 10001
EXPOSE 8000 4000
CMD ["audit-platform", "api", "serve", "--host", "0.0.0.0", "--port", "8000"]
