# The trainer image for launch/jobset_gke.yaml (TPU VMs): this repository installed with its TPU extra.
#   docker build -t IMAGE . && docker push IMAGE
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git ffmpeg && rm -rf /var/lib/apt/lists/*
WORKDIR /sora_jax
COPY setup.py README.md ./
COPY sora_jax ./sora_jax
COPY configs ./configs
COPY launch ./launch
RUN pip install --no-cache-dir -e '.[tpu]'
ENTRYPOINT []
CMD ["python", "-m", "sora_jax.train", "--helpfull"]
