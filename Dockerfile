# extract-embeddings on a CUDA PyTorch runtime.
#   docker build -t qwen2-audio-embeddings .
#   docker run --gpus all -v /data:/data qwen2-audio-embeddings \
#       --manifest /data/manifest.parquet --model /data/Qwen2-Audio-7B --adapter /data/lora --output /data/emb
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

# libsndfile is bundled in the soundfile wheel and FFmpeg in the av wheel: no system audio packages.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /opt/extractor
COPY pyproject.toml README.md ./
COPY extractor ./extractor
COPY jobs ./jobs
# torch comes from the base image; the range in pyproject.toml accepts it, so pip keeps it.
RUN pip install . && python -c "import extractor, torch; print('torch', torch.__version__)"

RUN useradd --create-home --uid 10001 extractor
USER extractor
WORKDIR /home/extractor

ENTRYPOINT ["extract-embeddings"]
CMD ["--help"]
