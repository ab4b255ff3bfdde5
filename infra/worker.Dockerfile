# The Prefect process worker of compose.yaml: tinyldm's environment (CPU torch, Tesseract,
# DejaVu fonts, git, DVC's S3 plugin). Flow runs execute in the checkout that compose.yaml
# mounts at /opt/tinyldm, where the package is installed editable: updating that checkout
# updates the code. Rebuild the image when pyproject.toml changes.
# Build context: the repository root (worker.Dockerfile.dockerignore keeps it small).
FROM python:3.11-slim-bookworm
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# the Prefect and MLflow clients at the versions of compose.yaml's servers
ARG PREFECT_VERSION=3.9.1
ARG MLFLOW_VERSION=3.17.2
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      tesseract-ocr fonts-dejavu-core git \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/tinyldm
COPY pyproject.toml README.md ./
COPY components components
COPY flows flows
RUN pip install --no-cache-dir "$TORCH" --index-url "$TORCH_INDEX" \
 && pip install --no-cache-dir -e . "$TORCH" "prefect==$PREFECT_VERSION" \
      "mlflow==$MLFLOW_VERSION" dvc-s3
# the mounted checkout belongs to another uid: let git read it (each run logs its commit)
RUN git config --system --add safe.directory /opt/tinyldm
# DVC remote `store`: its url comes from the checkout's .dvc/config; from inside compose it
# is reached at the service name. System level: a value the checkout itself sets wins.
ENV DVC_SYSTEM_CONFIG_DIR=/etc/tinyldm/dvc
RUN mkdir -p /etc/tinyldm/dvc \
 && printf "['remote \"store\"']\n    endpointurl = http://minio:9000\n" \
      > /etc/tinyldm/dvc/config
CMD ["prefect", "worker", "start", "--pool", "tinyldm", "--type", "process"]
