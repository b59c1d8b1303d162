"""The run folder and what is written into it: paths (`folder`), checkpoints written
(`checkpoint`) and read (`checkpoint_io`), and the report's keys and views (`report`)."""

from qatdist.run.folder import RunFolder

__all__ = ["RunFolder"]
