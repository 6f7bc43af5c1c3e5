-- Run once by the postgres image's entrypoint when it initialises an empty volume: the database of MLflow's
-- users and permissions, beside the tracking database (POSTGRES_DB) it creates itself.
CREATE DATABASE mlflow_auth OWNER mlflow;
