# The vLLM engine simulator, for demos and end-to-end tests without GPUs. Build from the root:
#   docker build -f docker/engine-sim.Dockerfile -t ebbtide/engine-sim:0.1.0 .
# It answers to `vllm serve MODEL --port P ...`, the command the operator renders, so an
# InferenceService with image ebbtide/engine-sim:0.1.0 runs simulated replicas.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    VLLM_SERVER_DEV_MODE=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip install . && rm -rf /src
COPY --chmod=0755 docker/vllm-shim.py /usr/local/bin/vllm

RUN groupadd --system --gid 10001 ebbtide \
 && useradd --system --uid 10001 --gid ebbtide --home-dir /tmp --shell /usr/sbin/nologin ebbtide
USER 10001:10001
WORKDIR /tmp

EXPOSE 8000
ENTRYPOINT ["ebbtide", "engine-sim"]
CMD ["--host", "0.0.0.0"]
