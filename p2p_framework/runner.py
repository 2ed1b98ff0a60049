"""Running :class:`~p2p_framework.spec.RunSpec` s: the model cache, the output folder's
lifecycle, one run (:func:`run_job`) and a pipeline file's jobs in UNet batches
(:func:`run_pipeline`)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import P2PError, PluginRunError
from .model import load_model
from .outputs import RunFolder, write_run
from .pipeline import EditJob, iter_edits, run_edit
from .pipeline_file import Pipeline, pipeline_job_spec
from .registry import PluginRegistry, get_registry
from .signals import raise_pending
from .spec import JobError, RunSpec

#: Environment variable naming the model when ``--model`` (or a pipeline's ``model``) is absent.
MODEL_ENV = "P2P_FRAMEWORK_MODEL"
#: UNet rows per batch that ``max_batch_rows="auto"`` (``p2p-run run --batch-rows auto``)
#: gives, by device type: on a GPU a batch of 16 rows (4 one-target edits) fills the device
#: better than 4; on the CPU the UNet's cost grows with its rows and batching gained little
#: (see docs/benchmarks.md), so jobs run one at a time. Other devices use the ``cpu`` entry.
AUTO_BATCH_ROWS: dict[str, int] = {"cuda": 16, "cpu": 1}

Progress = Callable[[int, int, dict[str, Any]], None]


def model_from_env(model: str | None) -> str:
    """``model``, else ``$P2P_FRAMEWORK_MODEL``, else the embedded demo model's folder."""
    from .demo import DEMO_MODEL_DIR

    return str(model or os.environ.get(MODEL_ENV) or DEMO_MODEL_DIR)


class ModelCache:
    """Keeps the last loaded model, so jobs that share a model load it once.

    Args:
        loader: ``loader(model, device=, dtype=, revision=, compile=)`` (default
            :func:`~p2p_framework.load_model`).
        size: how many models to keep (1: a job naming another model replaces it).
    """

    def __init__(self, loader: Callable[..., Any] | None = None, size: int = 1) -> None:
        self._loader = loader or load_model
        self._size = max(1, size)
        self._models: dict[tuple[Any, ...], Any] = {}
        self.loads = 0

    @staticmethod
    def key(spec: RunSpec) -> tuple[Any, ...]:
        """What tells two jobs' models apart: jobs with equal keys share one model."""
        return (model_from_env(spec.model), spec.revision, spec.device, spec.dtype, spec.compile)

    def get(self, spec: RunSpec) -> tuple[Any, float]:
        """The model of ``spec`` and the seconds spent loading it (0 when cached)."""
        key = self.key(spec)
        if key in self._models:
            self._models[key] = self._models.pop(key)
            return self._models[key], 0.0
        began = time.perf_counter()
        model = self._loader(
            key[0],
            device=spec.device,
            dtype=spec.dtype,
            revision=spec.revision,
            compile=spec.compile,
        )
        self.loads += 1
        raise_pending()  # a Ctrl-C swallowed while loading (in a __del__) ends the run here
        self._models[key] = model
        while len(self._models) > self._size:
            self._models.pop(next(iter(self._models)))
        return model, time.perf_counter() - began


def model_changed(spec: RunSpec, model: Any) -> str | None:
    """For a rerun: a warning when the loaded model is not the recorded one, else None."""
    recorded = spec.identity or {}
    if recorded.get("folder_hash") and recorded["folder_hash"] != model.identity.get("folder_hash"):
        return (
            f"the model folder {recorded.get('model')!r} changed since the recorded run "
            "(its folder hash differs); images may differ"
        )
    if recorded.get("commit") and model.identity.get("commit") not in (None, recorded["commit"]):
        found = model.identity.get("commit")
        return f"the model is at commit {found}, the record has {recorded['commit']}"
    return None


@dataclass
class _Started:
    """A run whose output folder is claimed (:class:`~p2p_framework.outputs.RunFolder`),
    before its files are written."""

    spec: RunSpec
    folder: RunFolder
    began: float = field(default_factory=time.perf_counter)

    @property
    def out(self) -> Path:
        """The output folder."""
        return self.folder.target

    @classmethod
    def begin(
        cls,
        spec: RunSpec,
        out_dir: str | os.PathLike[str] | RunFolder | None,
        overwrite: bool = False,
    ) -> _Started:
        """Claim the output folder: lock it, check it holds no other run (unless
        ``overwrite``) and stage it."""
        target = out_dir if out_dir is not None else spec.out
        if target is None:
            raise JobError("no output folder given (--out)")
        if isinstance(target, RunFolder):
            return cls(spec, target)
        return cls(spec, RunFolder.claim(target, overwrite=overwrite))

    def discard(self) -> None:
        """Give the output folder up: nothing of this run appears, an earlier run there
        stays as it was."""
        self.folder.abort()

    def finish(
        self,
        result: Any,
        model: Any,
        load_seconds: float,
        *,
        registry: PluginRegistry,
        command: Sequence[str] | None,
        elapsed: float | None = None,
    ) -> tuple[dict[str, Any], list[Path]]:
        """Write the run's files. ``elapsed``: seconds to count as its time before writing
        (for a batched job: its setup, load, source, batch denoising and decode); default:
        the wall time since it began."""
        began = self.began if elapsed is None else time.perf_counter() - elapsed
        return write_run(
            result,
            self.folder,
            model,
            mode=self.spec.mode,
            save_attention=self.spec.save_attention,
            registry=registry,
            timings={"load_model": load_seconds},
            command=command,
            name=self.spec.name,
            started=began,
        )


def run_job(
    spec: RunSpec,
    out_dir: str | os.PathLike[str] | RunFolder | None = None,
    *,
    registry: PluginRegistry | None = None,
    models: ModelCache | None = None,
    progress: Progress | None = None,
    command: Sequence[str] | None = None,
    warn: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> tuple[dict[str, Any], list[Path]]:
    """Run one spec and write its files (see :func:`p2p_framework.outputs.write_run`): the
    output folder is claimed first (:class:`~p2p_framework.outputs.RunFolder`: refused if
    it holds another run, unless ``overwrite``), then the model is loaded (or taken from
    ``models``). The files appear together when the run is done, or not at all.
    ``out_dir`` may be a :class:`~p2p_framework.outputs.RunFolder` claimed already.

    Returns:
        ``(record, paths)``: the ``run.json`` record and the files written.
    """
    registry = registry if registry is not None else get_registry()
    started = _Started.begin(spec, out_dir, overwrite)
    try:
        model, load_seconds = (models or ModelCache()).get(spec)
        changed = model_changed(spec, model) if warn is not None else None
        if changed:
            warn(changed)  # type: ignore[misc]
        result = run_edit(
            model,
            spec.prompts,
            spec.edits,
            source=spec.source,
            settings=spec.settings,
            progress=progress,
        )
    except PluginRunError as error:
        error.resolve(registry)  # the plugin's registered name and package
        started.discard()
        raise
    except BaseException:
        started.discard()  # nothing of this run appears; an earlier run there stays whole
        raise
    return started.finish(result, model, load_seconds, registry=registry, command=command)


@dataclass
class JobOutcome:
    """What became of one job of a pipeline."""

    name: str
    ok: bool = False
    record: dict[str, Any] | None = None
    paths: list[Path] = field(default_factory=list)
    error: str | None = None
    out: Path | None = None
    plugin: dict[str, Any] | None = None

    def as_line(self) -> dict[str, Any]:
        """The JSON object ``p2p-run run --json`` prints for this job: its run record, or
        ``{"name", "status": "failed", "error", "out"}`` plus ``"plugin"`` (name, kind,
        package, version, hook, exception) when a plugin's code raised."""
        if self.ok and self.record is not None:
            return {**self.record, "name": self.name, "out": str(self.out)}
        line = {"name": self.name, "status": "failed", "error": self.error, "out": str(self.out)}
        if self.plugin is not None:
            line["plugin"] = self.plugin
        return line


def _error_text(error: BaseException) -> str:
    return str(error) if isinstance(error, P2PError) else f"{type(error).__name__}: {error}"


def _batch_label(names: Sequence[str]) -> str:
    """A progress label for a batch: the job's name, or ``N jobs (a, b, c)``."""
    if len(names) == 1:
        return names[0]
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} jobs ({shown})"


def _relabel(names: list[str], progress: Callable[[str], Progress | None] | None) -> Progress:
    """The loop's progress callback, calling ``progress(label)``'s callback of each job or
    batch (made once per label)."""
    callbacks: dict[str, Progress | None] = {}

    def on_progress(done: int, steps: int, info: dict[str, Any]) -> None:
        jobs = [info["job"]] if "job" in info else info.get("jobs", [])
        label = _batch_label([names[i] for i in jobs])
        if label not in callbacks:
            callbacks[label] = progress(label) if progress is not None else None
        callback = callbacks[label]
        if callback is not None:
            callback(done, steps, {k: v for k, v in info.items() if k not in ("job", "jobs")})

    return on_progress


class _PipelineRun:
    """The state of one :func:`run_pipeline` call: the started jobs and their outcomes."""

    def __init__(
        self,
        pipeline: Pipeline,
        on_done: Callable[[JobOutcome], None] | None,
        registry: PluginRegistry,
    ) -> None:
        self.registry = registry
        self.outcomes = [JobOutcome(pipeline.job_name(i)) for i in range(len(pipeline.jobs))]
        self.started: dict[int, _Started] = {}
        self.pending: set[int] = set()
        self.on_done = on_done

    def finish(self, index: int, error: BaseException | None = None) -> None:
        if error is not None:
            if isinstance(error, PluginRunError):
                self.outcomes[index].plugin = error.resolve(self.registry).as_json()
            self.outcomes[index].error = _error_text(error)
            if index in self.started:
                self.started[index].discard()
        self.pending.discard(index)
        if self.on_done is not None:
            self.on_done(self.outcomes[index])

    def by_model(self) -> list[list[int]]:
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, job in self.started.items():
            groups.setdefault(ModelCache.key(job.spec), []).append(index)
        return list(groups.values())


def run_pipeline(
    pipeline: Pipeline,
    *,
    registry: PluginRegistry | None = None,
    overrides: Mapping[str, Any] | None = None,
    out_root: str | os.PathLike[str] | None = None,
    models: ModelCache | None = None,
    on_start: Callable[[int, int, str], None] | None = None,
    on_done: Callable[[JobOutcome], None] | None = None,
    progress: Callable[[str], Progress | None] | None = None,
    command: Sequence[str] | None = None,
    warn: Callable[[str], None] | None = None,
    max_batch_rows: int | str | None = 1,
    overwrite: bool = False,
) -> list[JobOutcome]:
    """Run every job of a pipeline; a failing job is recorded and the others run. A job fails
    alone on a :class:`P2PError` or ``OSError``, and on any exception of its plugins' code
    (edits, sources, guides: a :class:`~p2p_framework.errors.PluginRunError` naming the
    plugin) or of its own setup. Errors of a whole batch (the UNet, out of memory) and
    ``KeyboardInterrupt`` propagate.

    First every job is resolved (its plugins built) and its output folder checked (a job
    that fails there is done with). Then, model by model (in the order the file first names
    them, each loaded once), the jobs run through :func:`p2p_framework.pipeline.iter_edits`:
    jobs that share steps, guidance on/off, image size, scheduler and
    ``separate_uncond_pass`` go into one UNet batch of at most ``max_batch_rows`` rows, and
    each job's files are written as soon as its batch is done. Each job's images and record
    are what it gives alone (up to float rounding of the larger batch); its ``denoise``
    timing is its batch's.

    Args:
        on_start: ``on_start(index, total, name)`` before each job is resolved.
        on_done: called with each job's outcome, when it has failed or its files are written.
        progress: ``progress(label)`` gives the per-step callback of a job or batch, or None;
            ``label`` is the job's name, or ``"N jobs (a, b, ...)"`` for a batch.
        max_batch_rows: most UNet rows per batch (a job of ``P`` prompts takes ``2 P`` with
            guidance); 1 runs the jobs one at a time (as ``p2p-run edit`` would); None: no
            limit; ``"auto"``: :data:`AUTO_BATCH_ROWS` for the model's device.
        overwrite: replace job folders that hold an earlier run; without it such a job
            fails (its folder untouched) and the others run.

    Returns:
        The outcomes, in the file's job order.
    """
    registry = registry if registry is not None else get_registry()
    models = models if models is not None else ModelCache()
    run = _PipelineRun(pipeline, on_done, registry)
    total = len(pipeline.jobs)
    for index in range(total):
        if on_start is not None:
            on_start(index, total, run.outcomes[index].name)
        try:
            spec = pipeline_job_spec(
                pipeline, index, registry, overrides=overrides, out_root=out_root
            )
            run.outcomes[index].out = Path(spec.out) if spec.out else None
            run.started[index] = _Started.begin(spec, None, overwrite)
            run.pending.add(index)
        except (P2PError, OSError) as error:
            run.finish(index, error)
    try:
        for indices in run.by_model():
            _run_model_group(
                run, indices, models, registry, progress, command, warn, max_batch_rows
            )
    finally:
        for index in run.pending:  # interrupted: nothing of the unfinished jobs appears
            run.started[index].discard()
    return run.outcomes


def _run_model_group(
    run: _PipelineRun,
    indices: list[int],
    models: ModelCache,
    registry: PluginRegistry,
    progress: Callable[[str], Progress | None] | None,
    command: Sequence[str] | None,
    warn: Callable[[str], None] | None,
    max_batch_rows: int | str | None,
) -> None:
    """Load the model of jobs ``indices`` once and run them in batches."""
    try:
        model, load_seconds = models.get(run.started[indices[0]].spec)
    except (P2PError, OSError) as error:
        for index in indices:
            run.finish(index, error)
        return
    for index in indices:
        changed = model_changed(run.started[index].spec, model) if warn is not None else None
        if changed:
            warn(changed)  # type: ignore[misc]
    rows = max_batch_rows
    if rows == "auto":
        rows = AUTO_BATCH_ROWS.get(model.device.type, AUTO_BATCH_ROWS["cpu"])
    specs = [run.started[i].spec for i in indices]
    jobs = [EditJob(s.prompts, s.edits, s.source, s.settings) for s in specs]
    names = [run.outcomes[i].name for i in indices]
    for position, result in iter_edits(
        model,
        jobs,
        max_batch_rows=rows,  # type: ignore[arg-type]
        progress=_relabel(names, progress),
        errors="return",
    ):
        index = indices[position]
        if isinstance(result, BaseException):
            run.finish(index, result)
            continue
        # The job's time: the model's load (counted once), its source, its batch's
        # denoising and its decode.
        elapsed = sum(result.timings.values()) + load_seconds
        try:
            record, paths = run.started[index].finish(
                result, model, load_seconds, registry=registry, command=command, elapsed=elapsed
            )
        except (P2PError, OSError) as error:
            run.finish(index, error)
            continue
        load_seconds = 0.0  # the load counts once, for the first job written
        outcome = run.outcomes[index]
        outcome.ok, outcome.record, outcome.paths = True, record, paths
        run.finish(index)


__all__ = [
    "AUTO_BATCH_ROWS",
    "MODEL_ENV",
    "JobOutcome",
    "ModelCache",
    "model_changed",
    "model_from_env",
    "run_job",
    "run_pipeline",
]
