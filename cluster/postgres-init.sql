-- Databases of the Heimdall cluster, created by the postgres:15 image on its
-- first start (an empty data volume); see cluster/docker-compose.yml.
-- heimdall: the sample catalogue (HEIMDALL_CATALOG) and Optuna's studies
-- (HEIMDALL_OPTUNA_STORAGE); both create their tables on first use.
CREATE DATABASE heimdall;
-- mlflow: the MLflow tracking server's backend store (runs, model registry).
CREATE DATABASE mlflow;
