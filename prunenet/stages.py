"""Wall seconds per stage of a prune run, recorded in every folder's `prunenet_report.json`.

The in-memory route (`prunenet.runner`, `prunenet.pipeline`) times: `load` (reading the
model), `strategy` (a per-layer strategy or a target speed-up search, when asked), `text` (the
model's own text: written, or read from the cache), `cut` (planning, scoring, the
layer-by-layer cut and refit) and `save` (writing the folder). The report's `stages` is

    {"seconds": {"load": 2.1, "text": 0.3, "cut": 95.0, "save": 1.2}, "text": "cache",
     "peak_rss_mb": {"load": 1020.5, "text": 1498.0, "cut": 1960.2, "save": 1961.0}}

where `text` says where the own text came from: `generated`, `cache`, or `none` (the cut read
no text), and `peak_rss_mb` is the process's peak resident memory (`ru_maxrss`) when each stage
ended: a high-water mark, so the stage at which it rises is the one that set the run's peak
(absent where the system does not report it). `load`, `strategy` and `text` are done once per
run, so a run with several folders repeats them in each folder's report; `cut` and `save` are
each folder's own.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prunenet.io.cache import watch_lookups
from prunenet.io.saving import REPORT_FILE, atomic_file


@dataclass
class StageTimes:
    """Wall seconds per stage (`seconds`), and where the own text came from (`text`).

    :param seconds: stage name -> wall seconds, in the order the stages ran.
    :param text: `generated`, `cache` or `none` (set by `own_text`).
    """

    seconds: dict[str, float] = field(default_factory=dict)
    text: str = "none"
    peak_rss_mb: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        """Add the block's wall seconds to `stage` (a stage timed twice adds up) and record the
        peak resident memory when it ends."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
            peak = peak_rss_mb()
            if peak is not None:
                self.peak_rss_mb[stage] = peak

    @contextlib.contextmanager
    def own_text(self) -> Iterator[None]:
        """Time the block as `text` and record whether it wrote the text or read it: any
        cache lookup that computed its value counts as `generated`."""
        with watch_lookups() as lookups, self.timing("text"):
            yield
        if lookups:
            self.text = "cache" if all(read for _, read in lookups) else "generated"
        else:  # the text was made without the cache's knowledge
            self.text = "generated"

    def fork(self) -> StageTimes:
        """A copy for one output folder: the run's stages so far, the folder's to come."""
        return StageTimes(dict(self.seconds), self.text, dict(self.peak_rss_mb))

    def to_dict(self) -> dict:
        record = {"seconds": dict(self.seconds), "text": self.text}
        if self.peak_rss_mb:
            record["peak_rss_mb"] = dict(self.peak_rss_mb)
        return record


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far in MB (10**6 bytes), or None where the
    system does not report it (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return round(peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6, 1)


def rewrite_report(folder: str | Path, report) -> None:
    """Rewrite a saved folder's report once the save is timed (the report is written inside
    the save). Atomic; a failure leaves the report as the save wrote it, since the folder is
    complete and only the save's seconds would be missing.

    :param folder: the saved folder.
    :param report: its `PruneReport` (any `to_dict()`).
    """
    path = Path(folder).expanduser() / REPORT_FILE
    with contextlib.suppress(OSError), atomic_file(path) as staging:
        staging.write_text(json.dumps(report.to_dict(), indent=2))
