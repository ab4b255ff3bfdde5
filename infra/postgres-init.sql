-- Runs once, when the postgres volume is created (docker-entrypoint-initdb.d), as
-- POSTGRES_USER, which owns the databases. POSTGRES_DB (mlflow) already exists:
-- mlflow        MLflow's backend store (runs, metrics, registered models, aliases)
-- mlflow_auth   users and permissions of MLflow's basic-auth app (basic_auth.ini)
-- prefect       the Prefect server's database
CREATE DATABASE mlflow_auth;
CREATE DATABASE prefect;
