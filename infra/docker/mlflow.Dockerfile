# The MLflow tracking server of infra/k8s/mlflow.yaml: the pinned MLflow, boto3 for the S3
# artifact store and a PostgreSQL driver for the database backend.
#   docker build -f infra/docker/mlflow.Dockerfile -t $REGISTRY/resattn-mlflow:3.17.2 infra/docker
FROM python:3.11-slim
RUN pip install --no-cache-dir mlflow==3.17.2 boto3==1.43.117 psycopg2-binary==2.9.10
USER 1000
ENTRYPOINT ["mlflow"]
