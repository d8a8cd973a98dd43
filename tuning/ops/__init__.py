"""Operations for development and tests: local PostgreSQL + S3 servers (services), a local multi-node Ray cluster (localcluster)."""
