"""`GET /metrics`: Prometheus text format, written by hand (no client library on the hot path).

Counters live in this process; with several workers each process answers for itself (scrape
each worker, or sum by instance). Names:

- `keyplane_verifications_total{code}`: verifications by outcome code.
- `keyplane_verification_duration_seconds{code}`: histogram of verify handling time.
- `keyplane_cache_hits_total`, `keyplane_cache_misses_total`, `keyplane_cache_hit_ratio`,
  `keyplane_cache_entries`: the key cache.
- `keyplane_usage_flush_lag_seconds`: seconds since the last successful usage flush;
  `keyplane_usage_pending_requests`, `keyplane_usage_pending_denials`: what waits in memory;
  `keyplane_usage_flush_failures_total`; `keyplane_usage_denials_set_aside_total`: denial
  records dropped after repeated flush crashes (a bug; see `SET_ASIDE_AFTER_CRASHES`).
"""

from __future__ import annotations

import time
from bisect import bisect_left

from starlette.requests import Request
from starlette.responses import Response

from app.cache import KeyCache
from app.usage import UsageRecorder

BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)


class _Histogram:
    __slots__ = ("counts", "sum", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last slot is +Inf
        self.total = 0
        self.sum = 0.0


class Metrics:
    def __init__(self) -> None:
        self._by_code: dict[str, _Histogram] = {}

    def observe_verification(self, code: str, seconds: float) -> None:
        """O(log buckets), no allocation after a code's first sighting."""
        histogram = self._by_code.get(code)
        if histogram is None:
            histogram = self._by_code[code] = _Histogram()
        histogram.counts[bisect_left(BUCKETS, seconds)] += 1
        histogram.total += 1
        histogram.sum += seconds

    def count(self, code: str) -> int:
        histogram = self._by_code.get(code)
        return histogram.total if histogram else 0

    def render(self, cache: KeyCache, usage: UsageRecorder) -> str:
        lines = [
            "# HELP keyplane_verifications_total Verifications by outcome code.",
            "# TYPE keyplane_verifications_total counter",
        ]
        codes = sorted(self._by_code)
        for code in codes:
            lines.append(
                f'keyplane_verifications_total{{code="{code}"}} {self._by_code[code].total}'
            )
        lines += [
            "# HELP keyplane_verification_duration_seconds Time to handle a verification.",
            "# TYPE keyplane_verification_duration_seconds histogram",
        ]
        for code in codes:
            histogram = self._by_code[code]
            running = 0
            for bound, count in zip(BUCKETS, histogram.counts, strict=False):
                running += count
                lines.append(
                    "keyplane_verification_duration_seconds_bucket"
                    f'{{code="{code}",le="{bound:g}"}} {running}'
                )
            lines.append(
                "keyplane_verification_duration_seconds_bucket"
                f'{{code="{code}",le="+Inf"}} {histogram.total}'
            )
            lines.append(
                f'keyplane_verification_duration_seconds_sum{{code="{code}"}} {histogram.sum:.9f}'
            )
            lines.append(
                f'keyplane_verification_duration_seconds_count{{code="{code}"}} {histogram.total}'
            )
        lookups = cache.hits + cache.misses
        ratio = cache.hits / lookups if lookups else 0.0
        lag = max(0.0, time.monotonic() - usage.last_flush_monotonic)
        for name, kind, help_text, value in (
            ("keyplane_cache_hits_total", "counter", "Key cache hits.", cache.hits),
            ("keyplane_cache_misses_total", "counter", "Key cache misses.", cache.misses),
            ("keyplane_cache_hit_ratio", "gauge", "Hits over lookups since start.", ratio),
            ("keyplane_cache_entries", "gauge", "Entries in the key cache.", len(cache)),
            (
                "keyplane_usage_flush_lag_seconds",
                "gauge",
                "Seconds since the last successful usage flush.",
                lag,
            ),
            (
                "keyplane_usage_pending_requests",
                "gauge",
                "Counted verifications not yet written.",
                usage.pending_requests,
            ),
            (
                "keyplane_usage_pending_denials",
                "gauge",
                "Denial rows not yet written.",
                usage.pending_denials,
            ),
            (
                "keyplane_usage_flush_failures_total",
                "counter",
                "Usage flushes the database refused.",
                usage.flush_failures,
            ),
            (
                "keyplane_usage_denials_set_aside_total",
                "counter",
                "Denial records dropped after repeated flush crashes (a bug).",
                usage.denials_set_aside,
            ),
        ):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value!r}"]
        return "\n".join(lines) + "\n"


async def metrics_endpoint(request: Request) -> Response:
    state = request.app.state
    text = state.metrics.render(state.key_cache, state.usage)
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")
