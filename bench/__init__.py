"""`make bench`: throughput and latency of /v1/verify against a bare Starlette baseline."""
