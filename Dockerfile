# The training image (launch/gke_xpk.sh, or any container runtime): this checkout at /app, installed with
# EXTRAS: tpu,cloud for TPU pods, cuda,cloud for NVIDIA GPUs (the CUDA libraries come as wheels; the host
# provides the driver). Commands run from /app, where configs/ is read by path:
#   docker build --build-arg EXTRAS=cuda,cloud -t jaxgrounding .
#   docker run --gpus all jaxgrounding python -m jaxgrounding.train --config configs/meco.py --workdir /runs/meco
FROM python:3.12-slim
ARG EXTRAS=tpu,cloud
ENV PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY jaxgrounding ./jaxgrounding
RUN pip install --no-cache-dir ".[${EXTRAS}]"
COPY configs ./configs
COPY bench ./bench
CMD ["python", "-m", "jaxgrounding.train", "--help"]
