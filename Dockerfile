# extract-embeddings on CUDA.
#   docker build -t qwen2-audio-embeddings .
#   docker run --gpus all -v /data:/data qwen2-audio-embeddings \
#       --manifest /data/manifest.parquet --model /data/Qwen2-Audio-7B --adapter /data/lora --output /data/emb
#
# PyPI's torch wheel for linux x86_64 is a CUDA build that brings its CUDA libraries as wheels
# (torch 2.13.0: CUDA 13.0), so a slim Python base is enough. The host needs an NVIDIA driver that
# runs CUDA 13.0 (R580 or newer) and the NVIDIA container toolkit. libsndfile comes in the
# soundfile wheel and FFmpeg in the av wheel: no system audio packages.
FROM python:3.12-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# tini is PID 1: it passes SIGTERM on to the job, which then commits what it has embedded, releases
# its lock and exits 143 within Kubernetes' grace period (PID 1 itself gets no default signal
# actions), and it reaps orphaned processes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*

# Dependencies before the code, every one pinned and hashed (requirements/docker.in says how the lock
# is made): a change to the code rebuilds only the layers below.
COPY requirements/docker.lock /tmp/docker.lock
RUN pip install --no-deps --require-hashes -r /tmp/docker.lock && rm /tmp/docker.lock

WORKDIR /opt/extractor
COPY pyproject.toml README.md ./
COPY extractor ./extractor
COPY jobs ./jobs
# The package alone: its dependencies are the lock's, and pip check proves they are enough. The
# build needs only setuptools, which the lock has, so no unpinned package is fetched.
RUN pip install --no-deps --no-build-isolation . \
    && pip check \
    && python -c "import torch, torch.nn.attention.varlen as v, inspect; assert 'scale' in inspect.signature(v.varlen_attn).parameters; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" \
    && extract-embeddings --help > /dev/null

# A numeric UID, so that Kubernetes' runAsNonRoot can check it; a home for caches (HF_HOME, ~/.cache).
RUN groupadd --gid 10001 extractor && useradd --uid 10001 --gid 10001 --create-home extractor
USER 10001:10001
WORKDIR /home/extractor

ENTRYPOINT ["tini", "--", "extract-embeddings"]
CMD ["--help"]
