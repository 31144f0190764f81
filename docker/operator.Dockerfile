# The Ebbtide operator. Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t ebbtide/operator:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip install . && rm -rf /src

# The chart runs it with readOnlyRootFilesystem and runAsUser 10001; /tmp is an emptyDir.
RUN groupadd --system --gid 10001 ebbtide \
 && useradd --system --uid 10001 --gid ebbtide --home-dir /tmp --shell /usr/sbin/nologin ebbtide
USER 10001:10001
WORKDIR /tmp

EXPOSE 9090 8080
ENTRYPOINT ["ebbtide", "run"]
