# modelfleet: one image for routers, workers and the admin CLI.
#
#   docker build -t modelfleet:0.1.0 .
#   docker run --rm modelfleet:0.1.0 --help
#   docker run --rm -p 50051:50051 -e MODELFLEET_ETCD=etcd:2379 modelfleet:0.1.0 router
#   docker run --rm -p 50061:50061 -e MODELFLEET_ETCD=etcd:2379 -e MODELFLEET_STORE=s3://bucket/prefix \
#       -e MODELFLEET_ADVERTISE_HOST=<address routers dial> modelfleet:0.1.0 worker --worker-id w1
#
# Kubernetes: deploy/k8s (kustomize), deploy/README.md. Health: both servers answer
# grpc.health.v1 (service "") with SERVING once ready; Kubernetes probes it natively, so the image
# carries no HEALTHCHECK.

# --- build: the project and its runtime dependencies (no [dev] extra) into a virtualenv ------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A C compiler for the worker's single-row prediction in C (worker/_row_predict.c; optional: without
# it single rows take the slower ctypes path). Only this stage has it; the image gets the module.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/modelfleet
WORKDIR /src
# Only what the package build reads: pyproject.toml, the README it names, the packages.
COPY pyproject.toml README.md ./
COPY modelfleet ./modelfleet
COPY router ./router
COPY worker ./worker
COPY sharding ./sharding
COPY version_service ./version_service
COPY loadtest ./loadtest
RUN /opt/modelfleet/bin/pip install . \
 && rm -rf /src

# --- runtime -------------------------------------------------------------------------------------
FROM python:3.11-slim
# LightGBM's wheel links the system OpenMP runtime (libgomp.so.1), which the slim image lacks;
# routers and workers run on jemalloc where it is installed (modelfleet/allocator.py).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 libjemalloc2 \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 modelfleet \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/modelfleet --create-home \
      --shell /usr/sbin/nologin modelfleet
COPY --from=build /opt/modelfleet /opt/modelfleet
# jemalloc preloaded from the start, so routers and workers need not re-execute onto it.
ENV PATH=/opt/modelfleet/bin:$PATH \
    LD_PRELOAD=libjemalloc.so.2 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MODELFLEET_HOST=0.0.0.0 \
    MODELFLEET_WORKER_PORT=50061
USER 10001:10001
WORKDIR /home/modelfleet
# Fails the build if an import (LightGBM's native library included) is broken.
RUN modelfleet --help > /dev/null \
 && modelfleet worker --help > /dev/null \
 && modelfleet router --help > /dev/null
# 50051: router gRPC (MODELFLEET_ROUTER_PORT), 50061: worker gRPC (MODELFLEET_WORKER_PORT).
EXPOSE 50051 50061
ENTRYPOINT ["modelfleet"]
CMD ["--help"]
