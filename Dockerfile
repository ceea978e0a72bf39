# gitlab-log-shipper container image (OPERATIONS.md, "Containers and Kubernetes").
#   docker build -t gitlab-log-shipper .
#   docker run --rm -e GITLAB_URL=... -e GITLAB_TOKEN_FILE=/run/secrets/gitlab-token ... gitlab-log-shipper
# Configuration comes from the environment only: no .env is copied in (.dockerignore keeps it out).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# -- builder: the wheel, and a virtualenv with it and its dependencies (all pure Python) --------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN pip install --no-cache-dir "build==1.2.2.post1"
COPY pyproject.toml setup.cfg README.md ./
COPY gitlab_log_shipper ./gitlab_log_shipper
RUN python -m build --wheel --outdir /dist . \
 && python -m venv /opt/gitlab-log-shipper \
 && /opt/gitlab-log-shipper/bin/pip install --no-cache-dir /dist/*.whl \
 && /opt/gitlab-log-shipper/bin/pip uninstall --yes pip

# -- final: the slim base, the virtualenv, a non-root user; no compiler, no build, no pip in the venv ---------
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/gitlab-log-shipper/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STATE_DIR=/var/lib/gitlab-log-shipper \
    LOG_DIR=/var/log/gitlab-log-shipper \
    LOG_OUTPUT_DIR=/var/lib/gitlab-log-shipper/pipeline-logs
# uid/gid 10001: outside the ranges of the base image and of most hosts; Kubernetes' runAsUser uses the same.
RUN groupadd --system --gid 10001 gitlab-log-shipper \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/gitlab-log-shipper --no-create-home \
      --shell /usr/sbin/nologin gitlab-log-shipper \
 && install -d -m 0700 -o 10001 -g 10001 /var/lib/gitlab-log-shipper /var/log/gitlab-log-shipper
COPY --from=builder /opt/gitlab-log-shipper /opt/gitlab-log-shipper
USER 10001:10001
WORKDIR /var/lib/gitlab-log-shipper
# The state store (cursors, outbox, dead letters) must outlive the container: mount a volume here.
VOLUME ["/var/lib/gitlab-log-shipper", "/var/log/gitlab-log-shipper"]
# SIGTERM: the work in flight gets SHUTDOWN_GRACE (8 s) and the daemon exits 0; `docker stop` waits 10 s.
STOPSIGNAL SIGTERM
# No inbound port: health reads STATE_DIR (last cycle finished < HEALTH_MAX_AGE ago, or the running one progresses).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["gitlab-log-shipper", "health"]
ENTRYPOINT ["gitlab-log-shipper"]
CMD ["run"]
