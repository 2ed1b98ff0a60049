"""Pipeline files (TOML): a model and a list of jobs, each resolved into a
:class:`~p2p_framework.spec.RunSpec`. The format is documented in ``docs/cli.md``;
:func:`p2p_framework.runner.run_pipeline` runs them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .registry import PluginRegistry
from .spec import JobError, RunSpec, spec_from_job

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: Keys of a pipeline file's top level.
PIPELINE_KEYS = ("model", "revision", "device", "dtype", "compile", "out", "defaults", "jobs")
#: Top-level keys that are also defaults of every job.
_SHARED = ("model", "revision", "device", "dtype", "compile")


@dataclass
class Pipeline:
    """A pipeline file: shared settings and the jobs, as written (resolved one by one)."""

    path: Path
    top: dict[str, Any]
    defaults: dict[str, Any]
    jobs: list[dict[str, Any]]

    def job_name(self, index: int) -> str:
        """The job's ``name``, or ``job-N`` (1-based)."""
        return str(self.jobs[index].get("name") or f"job-{index + 1}")


def read_toml(path: Path, what: str, error: type[Exception]) -> dict[str, Any]:
    """The TOML file ``path`` as a dict; ``what`` names it in messages (``"pipeline file"``).

    Raises:
        error: unreadable (with the system's reason) or not valid TOML (with the parser's).
    """
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as problem:
        raise error(f"cannot read {what} {str(path)!r}: {problem.strerror or problem}") from None
    except ValueError as problem:  # tomllib.TOMLDecodeError
        raise error(f"{what} {str(path)!r} is not valid TOML: {problem}") from None


def load_pipeline(path: str | os.PathLike[str]) -> Pipeline:
    """Read and check a pipeline file (TOML; format in ``docs/cli.md``).

    Raises:
        JobError: unreadable, not TOML, unknown keys, no jobs, or duplicate job names.
    """
    path = Path(path)
    data = read_toml(path, "pipeline file", JobError)
    unknown = sorted(set(data) - set(PIPELINE_KEYS))
    if unknown:
        raise JobError(
            f"{path.name}: unknown top-level key(s) {', '.join(unknown)}; "
            f"expected: {', '.join(PIPELINE_KEYS)}"
        )
    jobs = data.get("jobs")
    if not isinstance(jobs, list) or not jobs or not all(isinstance(j, dict) for j in jobs):
        raise JobError(f"{path.name}: give at least one [[jobs]] table")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise JobError(f"{path.name}: [defaults] must be a table")
    top = {k: v for k, v in data.items() if k not in ("jobs", "defaults")}
    pipeline = Pipeline(path, top, dict(defaults), [dict(j) for j in jobs])
    names = [pipeline.job_name(i) for i in range(len(jobs))]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise JobError(f"{path.name}: job names must be unique; repeated: {', '.join(duplicates)}")
    return pipeline


def pipeline_job_spec(
    pipeline: Pipeline,
    index: int,
    registry: PluginRegistry | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    out_root: str | os.PathLike[str] | None = None,
) -> RunSpec:
    """Resolve job ``index`` of a pipeline. Each key comes from the job itself, else from
    ``overrides`` (the command line's ``--model``, ``--device``, ``--dtype``...), else from
    the file's ``[defaults]``, else from the file's top level. Its output folder is its
    ``out``, else ``OUT_ROOT/NAME``."""
    base = {k: v for k, v in pipeline.top.items() if k in _SHARED}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    job = {**pipeline.jobs[index], "name": pipeline.job_name(index)}
    spec = spec_from_job(job, registry, defaults={**base, **pipeline.defaults, **given})
    if spec.out is None:
        root = out_root or pipeline.top.get("out") or Path("p2p-out") / pipeline.path.stem
        spec.out = str(Path(root) / pipeline.job_name(index))
    return spec


__all__ = ["PIPELINE_KEYS", "Pipeline", "load_pipeline", "pipeline_job_spec"]
