"""faas-ci: CI/CD pipelines that run as OpenFaaS functions.

The library every function image carries: the domain model (pipelines, runs) and one
small module per real dependency (NATS, S3, git, the gateway), importable without HTTP.
"""

STAGES = ("lint", "unit", "build", "integration", "promote", "deploy")
# Every function of the bundle (stack.yml's): a deploy stage may not take one's name.
FUNCTIONS = (*STAGES, "webhook", "runs", "pipeline-log", "timers", "notifier",
             "cache-invalidator", "secrets", "registry-retention")  # fmt: skip
