"""The local stack: OpenFaaS's HTTP contract on one machine, with no cluster.

Real NATS (JetStream, file storage) and a real S3 server (SeaweedFS), a gateway that is
also the provider (it runs every function of stack.yml as its own process, restarts it
when it dies, queues async invocations on JetStream and fires cron schedules), all bound
to 127.0.0.1 with their data under one folder.
"""
