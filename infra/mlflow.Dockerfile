# The MLflow tracking server of compose.yaml: the official image plus what this setup needs
# and the plain image lacks: the PostgreSQL driver, boto3 (artifacts in S3) and Flask-WTF
# (the basic-auth app). Keep MLFLOW_VERSION at the client's version (.venv: pip show mlflow).
ARG MLFLOW_VERSION=3.17.2
FROM ghcr.io/mlflow/mlflow:v${MLFLOW_VERSION}
ARG MLFLOW_VERSION
RUN pip install --no-cache-dir "mlflow[auth]==${MLFLOW_VERSION}" "psycopg2-binary>=2.9" boto3
