"""Communication figures of a sketched DDP run."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class SketchStats:
    """Communication figures, per optimizer step and in total (elements and bytes per rank).

    >>> import torch
    >>> stats = SketchStats()
    >>> stats.record_bucket(50, 200, torch.zeros(1000), compressed=True)
    >>> stats.end_iteration()
    >>> stats.step_bytes_sent, stats.compression_ratio
    (200, 20.0)
    """

    iterations: int = 0
    compressed_buckets: int = 0
    bypassed_buckets: int = 0
    nonfinite_buckets: int = 0
    state_resets: int = 0
    step_elements_sent: int = 0
    step_bytes_sent: int = 0
    step_elements_uncompressed: int = 0
    step_bytes_uncompressed: int = 0
    total_bytes_sent: int = 0
    total_bytes_uncompressed: int = 0
    _pending: list[int] = field(default_factory=lambda: [0, 0, 0, 0], repr=False)

    def record(self, elements: int, nbytes: int, full_elements: int, full_bytes: int) -> None:
        self._pending[0] += elements
        self._pending[1] += nbytes
        self._pending[2] += full_elements
        self._pending[3] += full_bytes

    def record_bucket(
        self, sent_elements: int, sent_bytes: int, buffer: Tensor, compressed: bool
    ) -> None:
        """Count one bucket: what was sent for it against its uncompressed ``buffer``."""
        self.record(
            sent_elements, sent_bytes, buffer.numel(), buffer.numel() * buffer.element_size()
        )
        if compressed:
            self.compressed_buckets += 1
        else:
            self.bypassed_buckets += 1

    def end_iteration(self) -> None:
        (
            self.step_elements_sent,
            self.step_bytes_sent,
            self.step_elements_uncompressed,
            self.step_bytes_uncompressed,
        ) = self._pending
        self.total_bytes_sent += self.step_bytes_sent
        self.total_bytes_uncompressed += self.step_bytes_uncompressed
        self._pending = [0, 0, 0, 0]
        self.iterations += 1

    @property
    def compression_ratio(self) -> float:
        """Uncompressed over sent bytes of the last step (1.0 before any step)."""
        return self.step_bytes_uncompressed / self.step_bytes_sent if self.step_bytes_sent else 1.0

    def as_record(self) -> dict[str, int]:
        """The counters as a plain dict (what a checkpoint stores)."""
        return {n: getattr(self, n) for n in self.__dataclass_fields__ if not n.startswith("_")}

    def as_dict(self) -> dict[str, float]:
        names = [n for n in self.__dataclass_fields__ if not n.startswith("_")]
        return {**{n: getattr(self, n) for n in names}, "compression_ratio": self.compression_ratio}
