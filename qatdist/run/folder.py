"""The run folder's layout: every path a run writes under `run.out_dir`, named once.

resolved_config.toml    the run's full config (what `export_final.py` rebuilds from)
topology.json           every rank's placement
checkpoints/step-<N>/   see qatdist.run.checkpoint
tb/                     TensorBoard event files
final/                  rank 0's int8 artifacts and report.json (see qatdist.finish.finalize)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunFolder:
    """The paths of the run folder at `root` (nothing is created or checked here)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def resolved_config(self) -> Path:
        return self.root / "resolved_config.toml"

    @property
    def topology(self) -> Path:
        return self.root / "topology.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def final_report(self) -> Path:
        """The report of the run's final model, written by `finalize` into `final/`."""
        return self.final / "report.json"
