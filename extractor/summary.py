"""What a run did, for operators (one line), orchestrators (JSON) and the benchmark (device figures)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class DeviceStats:
    """Filled by the device loop (batching.device); per device, summed or maxed across devices."""

    device: str = ""
    time_to_first_batch_s: float | None = None  # from the process's launch
    batches: int = 0
    oom_retries: int = 0
    fused_batches: int = 0  # with the fused add + LayerNorm (model/kernels.py), but maybe the one as it turned on
    useful_flops: float = 0.0  # the shared cost formula, real audio only
    steady_useful_flops: float = 0.0  # after the first batch is back
    steady_audio_seconds: float = 0.0
    steady_wall_seconds: float = 0.0
    device_idle_fraction: float | None = None  # of the steady phase, waiting for input
    gpu_peak_mem_gb: float | None = None
    host_rss_gb_first_batch: float | None = None
    host_rss_gb_end: float | None = None
    host_rss_gb_samples: list[float] = field(default_factory=list)
    last_batch_at: float | None = None  # monotonic clock when the last batch's results were back


@dataclass
class Summary:
    output: str
    shard: str = "0 of 1"
    rows_total: int = 0  # rows of this shard of the manifest
    skipped: int = 0  # already embedded or failed before this run
    embedded: int = 0
    failed: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    standing_failed: int = 0  # failure records for this shard's rows, this run's and earlier ones
    complete: bool = False  # _SUCCESS is there: every shard is done for this manifest
    noop: bool = False  # nothing to do: the markers say this manifest is done
    interrupted: str | None = None  # SIGINT / SIGTERM, when a signal ended the run
    tail_s: float | None = None  # from the last batch's results to this summary
    stats: DeviceStats = field(default_factory=DeviceStats)

    @property
    def attempted(self) -> int:
        return self.embedded + self.failed

    @property
    def failure_rate(self) -> float:
        """This run's: failed among the rows it attempted (what --max-failure-rate limits)."""
        return self.failed / self.attempted if self.attempted else 0.0

    @property
    def standing_failure_rate(self) -> float:
        """All failure records of this shard's rows over its rows (what the output holds)."""
        return self.standing_failed / self.rows_total if self.rows_total else 0.0

    @property
    def audio_seconds_per_second(self) -> float:
        return self.audio_seconds / self.wall_seconds if self.wall_seconds else 0.0

    def line(self) -> str:
        """The one line every run ends with."""
        head = "interrupted" if self.interrupted else ("nothing to do" if self.noop else "done")
        return (
            f"{head}: {self.embedded} embedded, {self.failed} failed, {self.skipped} skipped of {self.rows_total} rows; "
            f"{self.audio_seconds / 3600:.3f} h audio in {self.wall_seconds:.1f} s "
            f"({self.audio_seconds_per_second:,.1f} audio-s/s); standing failures {self.standing_failed} "
            f"({100 * self.standing_failure_rate:.2f}%); output {self.output}"
        )

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "stats"}
        d.update(asdict(self.stats))
        d.update(attempted=self.attempted, failure_rate=self.failure_rate, standing_failure_rate=self.standing_failure_rate,
                 audio_seconds_per_second=self.audio_seconds_per_second)
        return d


def merge(parts: list[Summary], output: str, shard: str, wall_seconds: float, complete: bool) -> Summary:
    """One Summary for runs side by side (devices of a host, shards of a cluster): counts summed,
    times of the slowest."""
    s = Summary(output=output, shard=shard, wall_seconds=wall_seconds, complete=complete)
    for p in parts:
        for name in ("rows_total", "skipped", "embedded", "failed", "audio_seconds", "standing_failed"):
            setattr(s, name, getattr(s, name) + getattr(p, name))
        for name in ("batches", "oom_retries", "fused_batches", "useful_flops", "steady_useful_flops", "steady_audio_seconds"):
            setattr(s.stats, name, getattr(s.stats, name) + getattr(p.stats, name))
    s.interrupted = next((p.interrupted for p in parts if p.interrupted), None)
    s.noop = bool(parts) and all(p.noop for p in parts)
    st = [p.stats for p in parts]
    s.stats.time_to_first_batch_s = _max(x.time_to_first_batch_s for x in st)
    s.stats.steady_wall_seconds = max((x.steady_wall_seconds for x in st), default=0.0)
    s.stats.gpu_peak_mem_gb = _max(x.gpu_peak_mem_gb for x in st)  # per device
    idle = [x.device_idle_fraction for x in st if x.device_idle_fraction is not None]
    s.stats.device_idle_fraction = sum(idle) / len(idle) if idle else None
    s.stats.host_rss_gb_first_batch = _sum(x.host_rss_gb_first_batch for x in st)  # the host's, all workers
    s.stats.host_rss_gb_end = _sum(x.host_rss_gb_end for x in st)
    s.stats.last_batch_at = _max(x.last_batch_at for x in st)
    names: dict[str, int] = {}
    for x in st:
        if x.device:
            names[x.device] = names.get(x.device, 0) + 1
    s.stats.device = ", ".join(f"{n} × {name}" if n > 1 else name for name, n in names.items())
    return s


def _max(values):
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _sum(values):
    present = [v for v in values if v is not None]
    return sum(present) if present else None
