"""faas-ci: CI/CD pipelines that run as OpenFaaS functions.

The library every function image carries: the domain model (pipelines, runs) and one
small module per real dependency (NATS, S3, git, the gateway), importable without HTTP.
"""

STAGES = ("lint", "unit", "build", "integration", "promote", "deploy")
