"""The denoising loop that runs a source, edits and the attention controller together.

:func:`run_edit` is the Python API behind ``p2p-run edit`` and ``p2p-run generate``: the
source gives the starting latent, the edits are composed into one
:class:`~p2p_framework.attention.AttentionController`, and the loop tells the controller the
step index and the conditional rows before every UNet call.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
from PIL import Image
from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from .attention import AttentionController
from .batch import ControllerGroup, plan_batches
from .edit import Edit, EditRun, RunContext
from .errors import NumericalError, OptionError, P2PError, P2PWarning, PluginRunError, PromptError
from .model import StableDiffusionModel, check_steps
from .model_sdxl import SizeConditioning
from .options import validate_fields
from .prompts import check_prompt_lengths
from .schedules import OWNER, CrossReplace, StepWindow, cross_replace_table, self_replace_window
from .signals import raise_pending
from .source import Source, SourceRequest, SourceStart, StepGuide
from .store import AttentionStore

ProgressCallback = Callable[[int, int, dict[str, Any]], None]


def _power_of_two(value: int) -> int:
    if value & (value - 1):
        raise PydanticCustomError("power_of_two", "must be a power of two")
    return value


def _positive_size(value: int) -> int:
    if value < 1:
        raise PydanticCustomError(
            "positive_size",
            "must be a positive multiple of the model's VAE scale factor (8 for SD, 4 for the "
            "demo model); leave it out for the model's own size",
        )
    return value


#: An image side in pixels: ``>= 1`` (its divisibility is checked against the model).
PixelSize = Annotated[int, AfterValidator(_positive_size)]

#: An ``int >= 1`` that is a power of two (a grid's downscale factor).
PowerOfTwo = Annotated[int, Field(ge=1), AfterValidator(_power_of_two)]


@dataclass
class EditSettings:
    """Settings of one run. Defaults are the published Prompt-to-Prompt ones.

    Every field is validated and converted on construction (:func:`options.validate_fields`),
    so ``EditSettings(cross_replace_steps={"default": 1.0, "lion": 0.4})``, the command line's
    text ``"default=1.0,lion=0.4"`` and a ``run.json`` value all give a :class:`CrossReplace`.

    Attributes:
        steps: diffusion steps (50).
        guidance: classifier-free guidance scale (7.5); 1 or less turns guidance off.
        height, width: image size in pixels, each a positive multiple of the model's VAE
            scale factor (8 for SD, 4 for the demo model); None means the model's own size.
        cross_replace_steps: when cross-attention is injected (:class:`CrossReplace`): a
            fraction ``s`` of the steps (``(0, s)``), a pair ``(a, b)``, or per word, such as
            ``{"default": 0.8, "lion": 0.4}`` (0.8).
        self_replace_steps: the :class:`StepWindow` (a fraction or a pair) of steps in which
            targets take the source's self-attention (0.4).
        self_replace_min_downscale: self-attention is replaced only in layers whose grid is
            the latent grid divided by at least this: 4 means the 16x16 layers of SD 1.x at
            512 px (the paper); 2 also takes the 32x32 ones (the null-text notebook).
        scheduler: ``ddim`` (default, as in the papers) or another name of
            :data:`p2p_framework.model.SCHEDULERS`.
        attention_maps: keep per-token cross-attention maps for :func:`attention_image`.
        attention_downscale: resolution of those maps, relative to the latent (4: 16x16 at
            512 px SD 1.x).
        separate_uncond_pass: run the unconditional and conditional halves as two UNet calls
            (less memory, same result).
        fused_edits: let edits that declare themselves linear (replace, refine, reweight)
            and self-attention taken from the source ride on the fused attention kernel, and
            rows no edit changes take it too (eager runs): about 1.03x plain generation's
            kernel launches per UNet call instead of 1.2x, which is what an edit costs where
            the GPU waits on launches, rounded differently from the reference
            implementation (latents within about 1e-5 of it, as the exact path's are).
            ``"auto"`` (the default) turns it on for an eager run on a CUDA device and off
            elsewhere: a CPU is compute-bound (the route gains nothing measurable there), so
            CPU runs keep the reference's arithmetic. :func:`resolve_fused_edits`.
        original_size, crop_top_left, target_size: SDXL's micro-conditioning, in pixels,
            ``(height, width)`` / ``(top, left)`` as ``StableDiffusionXLPipeline`` takes them;
            None (and (0, 0)) are diffusers' defaults: the image size, no crop. Other model
            families refuse anything else.
    """

    steps: Annotated[int, Field(ge=1)] = 50
    guidance: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 7.5
    height: PixelSize | None = None
    width: PixelSize | None = None
    cross_replace_steps: CrossReplace = CrossReplace(0.8)
    self_replace_steps: StepWindow = StepWindow(0.0, 0.4)
    self_replace_min_downscale: PowerOfTwo = 4
    scheduler: str = "ddim"
    attention_maps: bool = False
    attention_downscale: PowerOfTwo = 4
    separate_uncond_pass: bool = False
    fused_edits: bool | Literal["auto"] = "auto"
    original_size: tuple[PixelSize, PixelSize] | None = None
    crop_top_left: tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]] = (0, 0)
    target_size: tuple[PixelSize, PixelSize] | None = None

    def __post_init__(self) -> None:
        validate_fields(self, OWNER)

    @property
    def size_conditioning(self) -> SizeConditioning:
        """:attr:`original_size`, :attr:`crop_top_left` and :attr:`target_size` together."""
        return SizeConditioning(self.original_size, self.crop_top_left, self.target_size)

    def to_json(self) -> dict[str, Any]:
        """Every field, JSON-ready (schedules by their ``to_json()``), as ``run.json`` has it."""
        return {f.name: _json_value(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EditSettings:
        """Settings from :meth:`to_json`'s dict (also from a ``run.json`` written before the
        value objects: ``"default_"``, lists for pairs); unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _json_value(value: Any) -> Any:
    return value.to_json() if hasattr(value, "to_json") else value


@dataclass
class EditResult:
    """What a run produced.

    Attributes:
        prompts: source prompt, then targets.
        images: one PIL image per prompt (the source first).
        latents: ``(prompts, channels, height, width)`` final latents.
        attention_store: the maps that were tracked.
        settings: the settings used (sizes filled in).
        edits, source: the plugin objects used (their options).
        edit_runs: each edit's per-run state (:meth:`~p2p_framework.Edit.bind`), in the
            order of ``edits``; e.g. local blend's last ``mask``.
        source_info: what the source reported (seed, inversion statistics...).
        timings: seconds spent in ``source``, ``denoise`` and ``decode``; ``denoise`` is the
            wall time of the whole UNet batch the job ran in.
        batch: indices (in the :func:`run_edits` call) of the jobs that shared this job's UNet
            batch, itself included; ``[0]`` for :func:`run_edit`.
    """

    prompts: list[str]
    images: list[Image.Image]
    latents: torch.Tensor
    attention_store: AttentionStore
    settings: EditSettings
    edits: list[Edit]
    source: Source
    edit_runs: list[EditRun] = field(default_factory=list)
    source_info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    batch: list[int] = field(default_factory=lambda: [0])


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """PIL images from ``(batch, 3, H, W)`` floats in [0, 1], rounded as diffusers does."""
    array = images.detach().permute(0, 2, 3, 1).cpu().float().numpy()
    return [Image.fromarray(a) for a in (array * 255).round().astype("uint8")]


def _check_prompts(prompts: Sequence[str], tokenizer: Any) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise PromptError("give at least one prompt")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(f"prompt {i} is empty")
    check_prompt_lengths(tokenizer, prompts)
    return prompts


def _step_kwargs(scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
    accepted = set(inspect.signature(scheduler.step).parameters)
    return {"generator": generator} if "generator" in accepted else {}


@dataclass
class EditJob:
    """One edit to run with :func:`run_edits`: what :func:`run_edit` takes, as one object.

    Attributes:
        prompts: source prompt first, then targets (one image each).
        edits: edit plugin objects, applied in order. They hold only options (each run binds
            its own state), so jobs may share them.
        source: where the starting latent comes from; None means ``Seed()`` (seed 8888).
        settings: run settings; None means :class:`EditSettings`.
    """

    prompts: Sequence[str]
    edits: Sequence[Edit] = ()
    source: Source | None = None
    settings: EditSettings | None = None


@dataclass
class _PreparedJob:
    """A job set up for the denoising loop: its own scheduler, store, controller and start."""

    index: int
    prompts: list[str]
    edits: list[Edit]
    runs: list[EditRun]
    source: Source
    settings: EditSettings
    scheduler: Any
    store: AttentionStore
    run: RunContext
    controller: AttentionController
    start: SourceStart
    timings: dict[str, float]


def _resolve(model: StableDiffusionModel, job: EditJob) -> tuple[list[str], EditSettings]:
    """The job's checked prompts and its settings with the image size filled in and
    ``fused_edits`` resolved to a bool (:func:`resolve_fused_edits`).

    Raises:
        PromptError: an empty prompt, or one longer than the text encoder reads.
        OptionError: a size the VAE cannot take, more steps than the scheduler knows.
    """
    prompts = _check_prompts(job.prompts, model.tokenizer)
    settings = job.settings or EditSettings()
    height = model.default_size if settings.height is None else settings.height
    width = model.default_size if settings.width is None else settings.width
    model.latent_size(height, width)  # raises OptionError for sizes the VAE cannot take
    check_steps(settings.steps, model.max_steps)
    model.check_size_conditioning(settings.size_conditioning)
    fused = resolve_fused_edits(settings.fused_edits, model.device, compiled=model.compiled)
    # replace() validates again: a field set after construction is checked here.
    return prompts, dataclasses.replace(settings, height=height, width=width, fused_edits=fused)


def resolve_fused_edits(
    setting: bool | Literal["auto"], device: torch.device, *, compiled: bool = False
) -> bool:
    """Whether a run takes the fused edit route (:attr:`EditSettings.fused_edits`).

    ``"auto"`` is on for an eager UNet on a CUDA device, where an SD-size call waits on
    kernel launches rather than arithmetic (issue 16: an H100 took 28.7 ms per SD 1.5 call
    at batch 4 whether attention was fused or materialised), and off on other devices and
    for a compiled UNet, whose fixed plan does not use the route. True and False are kept.
    """
    if setting != "auto":
        return bool(setting)
    return device.type == "cuda" and not compiled


def batch_key(settings: EditSettings) -> tuple[Any, ...]:
    """What jobs must share to run in one UNet batch: steps, whether guidance is on, image
    size, scheduler, ``separate_uncond_pass``, ``fused_edits`` and SDXL's size conditioning.
    Everything else (guidance
    scale, schedules, edits, sources, attention maps) may differ between the jobs of a
    batch."""
    return (
        settings.steps,
        settings.guidance > 1.0,
        settings.height,
        settings.width,
        settings.scheduler,
        settings.separate_uncond_pass,
        settings.fused_edits,
        settings.size_conditioning,
    )


def unet_rows(prompts: int, settings: EditSettings) -> int:
    """Rows a job of ``prompts`` prompts adds to each UNet call: twice its prompts with
    guidance in one pass (unconditional and conditional rows), else its prompts."""
    guided = settings.guidance > 1.0
    return 2 * prompts if guided and not settings.separate_uncond_pass else prompts


def _prepare_job(
    model: StableDiffusionModel,
    job: EditJob,
    index: int,
    resolved: tuple[list[str], EditSettings],
    progress: ProgressCallback | None,
) -> _PreparedJob:
    """Everything one job needs before the denoising loop: scheduler, attention store, edit
    setup, controller and the source's start (which may be a whole inversion).
    ``resolved``: what :func:`_resolve` gave for the job."""
    from .plugins.seed import Seed

    prompts, settings = resolved
    source = job.source if job.source is not None else Seed()
    edits = list(job.edits)
    latent_size = model.latent_size(settings.height, settings.width)  # type: ignore[arg-type]
    device = model.device
    steps = settings.steps

    scheduler = model.make_scheduler(settings.scheduler)
    scheduler.set_timesteps(steps, device=device)
    store = AttentionStore()
    store.device_counts = model.compiled  # eager: counts in Python, a kernel fewer per map
    if settings.attention_maps:
        store.track(downscale=settings.attention_downscale, cross=True)
    run = RunContext(
        prompts,
        model.tokenizer,
        steps,
        latent_size,
        store,
        device,
        self_replace_window=self_replace_window(settings.self_replace_steps, steps),
        self_replace_min_downscale=settings.self_replace_min_downscale,
        compiled=model.compiled,
        cross_attention_levels=model.cross_attention_levels(latent_size),
    )
    runs = [edit.bind(run) for edit in edits]

    injecting = len(prompts) > 1 and any(r.injects_cross_attention for r in runs)
    cross_table = (
        cross_replace_table(settings.cross_replace_steps, prompts, steps, model.tokenizer)
        if injecting
        else None
    )
    controller = AttentionController(
        runs,
        store=store,
        cross_table=cross_table,
        latent_size=latent_size,
        num_steps=steps,
        static=model.compiled,
        fused=settings.fused_edits,
    ).to(device)
    store.allocate(len(prompts), model.max_tokens, latent_size, device)
    if model.compiled:
        # Fixed addresses: CUDA graphs read and update these in place, without copies.
        for tensor in controller.tensors():
            torch._dynamo.mark_static_address(tensor)

    source_progress = None
    if progress is not None:

        def source_progress(done: int, total: int, info: dict[str, Any]) -> None:
            progress(done, total, {**info, "phase": "source", "job": index})

    began = time.perf_counter()
    start: SourceStart = source.prepare(
        SourceRequest(
            model,
            scheduler,
            prompts,
            steps,
            settings.guidance,
            settings.height,  # type: ignore[arg-type]
            settings.width,  # type: ignore[arg-type]
            source_progress,
        )
    )
    timings = {"source": time.perf_counter() - began}
    raise_pending()  # a signal swallowed during the source's work (an inversion) ends it here
    return _PreparedJob(
        index,
        prompts,
        edits,
        runs,
        source,
        settings,
        scheduler,
        store,
        run,
        controller,
        start,
        timings,
    )


def _check_jobs(jobs: Sequence[EditJob]) -> list[EditJob]:
    jobs = list(jobs)
    for index, job in enumerate(jobs):
        if not isinstance(job, EditJob):
            raise OptionError(
                "pipeline", "jobs", f"job {index} is a {type(job).__name__}, not an EditJob"
            )
    return jobs


def _plugin_objects(job: EditJob | _PreparedJob) -> list[tuple[object, object, str]]:
    """``(object, plugin, kind)`` for every object whose methods run a job's plugin code: its
    edits and their runs, its source and the source's step guide."""
    edits = list(job.edits)
    objects: list[tuple[object, object, str]] = [(edit, edit, "edit") for edit in edits]
    source = job.source
    if isinstance(job, _PreparedJob):
        objects += [(run, edit, "edit") for run, edit in zip(job.runs, edits)]
        if job.start.guide is not None:
            objects.append((job.start.guide, source, "source"))
    if source is not None:
        objects.append((source, source, "source"))
    return objects


_CORE_MODULES = ("p2p_framework.",)
_PLUGIN_MODULES = ("p2p_framework.plugins.", "p2p_framework.inversion.")


def _is_core(module: str) -> bool:
    """Whether ``module`` is p2p-framework's own loop code (not a plugin's)."""
    return module.startswith(_CORE_MODULES) and not module.startswith(_PLUGIN_MODULES)


def job_error(error: Exception, job: EditJob | _PreparedJob) -> Exception:
    """The error to report for a job whose code raised ``error``.

    :class:`P2PError` and ``OSError`` (bad input, an unreadable file) are returned as they
    are. Any other exception is traced to the plugin whose code raised it: the innermost frame
    of its traceback whose ``self`` is one of the job's edits, edit runs, source or step
    guide (else whose module is such an object's module, for a plugin's helper function);
    it comes back as a :class:`PluginRunError` naming that plugin and hook. An exception of
    p2p-framework's own code (no plugin frame) is returned unchanged (a bug).
    """
    if isinstance(error, (P2PError, OSError)):
        return error
    objects = _plugin_objects(job)
    frames = [frame for frame, _ in traceback.walk_tb(error.__traceback__)]
    for frame in reversed(frames):
        owner = frame.f_locals.get("self")
        for obj, plugin, kind in objects:
            if owner is obj:
                return PluginRunError(plugin, kind, error, frame.f_code.co_name)
    for frame in reversed(frames):
        module = str(frame.f_globals.get("__name__", ""))
        if _is_core(module):
            continue
        for obj, plugin, kind in objects:
            if type(obj).__module__ == module:
                return PluginRunError(plugin, kind, error, frame.f_code.co_name)
    return error


def iter_edits(
    model: StableDiffusionModel,
    jobs: Sequence[EditJob],
    *,
    max_batch_rows: int | None = None,
    progress: ProgressCallback | None = None,
    errors: str = "raise",
) -> Iterator[tuple[int, EditResult | Exception]]:
    """Run jobs, batching those that can share a UNet batch; yield each job's result as soon
    as its batch is done.

    Jobs share a batch when their :func:`batch_key` is equal, in their given order, up to
    ``max_batch_rows`` UNet rows (:func:`unet_rows`). Within a batch every job keeps its own
    scheduler, attention controller (edits, schedules, store), starting latent and source
    :class:`~p2p_framework.source.StepGuide` (per-step unconditional embedding, latent
    corrections), and its guide's and edits' ``after_step`` see only its own rows; its
    result equals what :func:`run_edit` gives for it alone, up to float rounding
    of the larger UNet batch.

    Args:
        model: from :func:`p2p_framework.load_model`.
        jobs: the jobs.
        max_batch_rows: most UNet rows per batch (memory); None for no limit. A job with more
            rows than this runs alone.
        progress: called as ``progress(done, total, info)``: during a job's source work with
            ``info["phase"] == "source"`` and ``info["job"]`` (its index), and after each
            denoising step of a batch with ``info["phase"] == "denoise"`` and
            ``info["jobs"]`` (the indices of the batch's jobs).
        errors: ``"raise"``: a job's error is raised at once; ``"return"``: it is yielded in
            place of the job's result and the other jobs go on. A job's error is a
            :class:`P2PError` (bad input; a :class:`PluginRunError` when a plugin's code
            raised anything else, see :func:`job_error`), an ``OSError`` (e.g. an unreadable
            photo), or any other exception of a job's own setup. Errors of the whole batch
            (the UNet, the VAE, out of memory) and ``KeyboardInterrupt`` are always raised.

    Yields:
        ``(job index, EditResult)``, or ``(job index, error)`` with ``errors="return"``; in
        the order the batches finish, each batch's jobs in job order.

    Raises:
        OptionError: bad ``jobs``, ``max_batch_rows`` or ``errors``.
    """
    if errors not in ("raise", "return"):
        raise OptionError("pipeline", "errors", f"expected 'raise' or 'return', got {errors!r}")
    jobs = _check_jobs(jobs)
    keys: list[tuple[Any, ...] | None] = []
    rows: list[int] = []
    resolved: dict[int, tuple[list[str], EditSettings]] = {}
    for index, job in enumerate(jobs):
        try:
            prompts, settings = resolved[index] = _resolve(model, job)
        except (P2PError, OSError) as error:
            if errors == "raise":
                raise
            keys.append(None)
            rows.append(0)
            yield index, error
            continue
        keys.append(batch_key(settings))
        rows.append(unet_rows(len(prompts), settings))
    for batch in plan_batches(keys, rows, max_batch_rows):
        prepared = []
        for index in batch:
            try:
                prepared.append(_prepare_job(model, jobs[index], index, resolved[index], progress))
            except Exception as error:  # a plugin's bind or prepare: this job fails alone
                reported = job_error(error, jobs[index])
                if errors == "raise":
                    if reported is error:
                        raise
                    raise reported from error
                yield index, reported
        if prepared:
            yield from _run_batch(model, prepared, progress, raise_errors=errors == "raise")


def run_edits(
    model: StableDiffusionModel,
    jobs: Sequence[EditJob],
    *,
    max_batch_rows: int | None = None,
    progress: ProgressCallback | None = None,
) -> list[EditResult]:
    """Run many edits, batching those that share steps, guidance on/off, size, scheduler and
    ``separate_uncond_pass`` into one UNet batch (see :func:`iter_edits`).

    Args:
        model: from :func:`p2p_framework.load_model`.
        jobs: the edits, each an :class:`EditJob` with its own plugin objects.
        max_batch_rows: most UNet rows per batch; None for no limit (a job of ``P`` prompts
            takes ``2 P`` rows with guidance, ``P`` without or with ``separate_uncond_pass``).
        progress: as for :func:`iter_edits`.

    Returns:
        One :class:`EditResult` per job, in job order, each equal (up to float rounding) to
        what :func:`run_edit` gives for that job alone.

    Raises:
        P2PError: the first job that fails (nothing is returned then); a
            :class:`PluginRunError` when a plugin's code raised another exception.
    """
    results: dict[int, EditResult] = {}
    for index, result in iter_edits(
        model, jobs, max_batch_rows=max_batch_rows, progress=progress, errors="raise"
    ):
        assert isinstance(result, EditResult)
        results[index] = result
    return [results[index] for index in range(len(results))]


def run_edit(
    model: StableDiffusionModel,
    prompts: Sequence[str],
    edits: Sequence[Edit] = (),
    *,
    source: Source | None = None,
    settings: EditSettings | None = None,
    progress: ProgressCallback | None = None,
) -> EditResult:
    """Generate the source prompt's image and its edits in one batch.

    The same code path as :func:`run_edits` with one job; all the targets are rows of one
    UNet batch.

    Args:
        model: from :func:`p2p_framework.load_model`.
        prompts: source prompt first, then target prompts (one image each).
        edits: edit plugin objects, applied in order (e.g. refine then reweight).
        source: where the starting latent comes from; default ``Seed()`` (seed 8888).
        settings: run settings; default :class:`EditSettings`.
        progress: called as ``progress(done, total, info)``: by the source during its own
            work (``info["phase"] == "source"``, e.g. an inversion, with its ``loss``), then
            after each denoising step (``info["phase"] == "denoise"``).

    Returns:
        An :class:`EditResult`; ``images[0]`` is the source, ``images[i]`` target ``i``.
    """
    job = EditJob(prompts, edits, source, settings)
    return run_edits(model, [job], progress=progress)[0]


def _run_batch(
    model: StableDiffusionModel,
    jobs: list[_PreparedJob],
    progress: ProgressCallback | None,
    *,
    raise_errors: bool,
) -> Iterator[tuple[int, EditResult | Exception]]:
    """Denoise prepared jobs in one UNet batch, decode each, and yield their results (a job
    whose plugin failed: its error, see :func:`job_error`)."""
    group = ControllerGroup([job.controller for job in jobs], [len(job.prompts) for job in jobs])
    began = time.perf_counter()
    latents = _denoise(model, jobs, group, progress, raise_errors=raise_errors)
    denoise = time.perf_counter() - began
    batch = [job.index for job in jobs]
    for position, (job, job_latents) in enumerate(zip(jobs, latents)):
        error = group.errors.get(position)
        if error is not None:
            yield job.index, job_error(error, job)
            continue
        began = time.perf_counter()
        # One finiteness check per job, after the loop: a float16 overflow (or an edit that
        # made NaN) must not become a black PNG. No per-step sync slows the loop.
        pixels = None if _has_nonfinite(job_latents) else model.decode(job_latents)
        if pixels is not None and _has_nonfinite(pixels) and model.vae.dtype != torch.float32:
            # A half-precision VAE that overflows: decode once more in float32.
            pixels = model.decode_upcast(job_latents)
            if not _has_nonfinite(pixels):
                warnings.warn(
                    P2PWarning(
                        "the VAE overflowed in half precision (NaN pixels); these images were "
                        "decoded with the VAE in float32"
                    ),
                    stacklevel=2,
                )
        if pixels is None or _has_nonfinite(pixels):
            error = NumericalError(_overflow_message(model, "latents" if pixels is None else "vae"))
            if raise_errors:
                raise error
            yield job.index, error
            continue
        images = to_pil(pixels)
        timings = {**job.timings, "denoise": denoise, "decode": time.perf_counter() - began}
        yield (
            job.index,
            EditResult(
                job.prompts,
                images,
                job_latents,
                job.store,
                job.settings,
                job.edits,
                job.source,
                job.runs,
                dict(job.start.info),
                timings,
                batch,
            ),
        )


def _has_nonfinite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds NaN or an infinity (one reduction, one device sync)."""
    return not bool(torch.isfinite(tensor).all())


def _overflow_message(model: StableDiffusionModel, where: str) -> str:
    """What to tell a user whose run made NaN/inf: in the ``"latents"`` after denoising, or
    in the images the ``"vae"`` decoded."""
    half = model.dtype in (torch.float16, torch.bfloat16)
    precision = str(model.dtype).removeprefix("torch.")
    if where == "vae":
        half = model.vae.dtype != torch.float32  # decode_upcast was tried
        what = "the VAE decoded NaN or infinite pixels"
        fix = (
            "the VAE gives NaN even upcast to float32, so the latents are out of its range: "
            "run with --dtype float32"
            if half
            else "the latents are out of the VAE's range"
        )
    else:
        what = "the latents hold NaN or infinite values after denoising"
        fix = (
            f'{precision} overflowed: run with --dtype float32 (load_model(..., dtype="float32"))'
            if half
            else "an edit or the source made them (check the plugins' after_step and "
            "attention hooks)"
        )
    return f"{what}, so no image was written; {fix}"


def _uncond_embedding(
    guide: StepGuide | None, step: int, empty: torch.Tensor | None
) -> torch.Tensor | None:
    """The ``(1, tokens, dim)`` unconditional embedding a job's source asks for at ``step``,
    else ``empty`` (the embedding of ``""``)."""
    embedding = guide.uncond_embedding(step) if guide is not None else None
    return empty if embedding is None else embedding


@torch.no_grad()
def _denoise(
    model: StableDiffusionModel,
    jobs: list[_PreparedJob],
    group: ControllerGroup,
    progress: ProgressCallback | None,
    *,
    raise_errors: bool,
) -> list[torch.Tensor]:
    """The denoising loop of one batch.

    The UNet batch is ``[uncond rows of job 0, of job 1, ..., cond rows of job 0, ...]`` (one
    pass), or the two halves as two calls with ``separate_uncond_pass``, or the cond rows alone
    without guidance. Each job steps its own scheduler on its own rows. A job's source guide
    (``SourceStart.guide``, a :class:`~p2p_framework.source.StepGuide`) gives the ``(1, tokens,
    dim)`` unconditional embedding of its rows at each step (None: ``""``) and corrects its
    ``(prompts, C, h, w)`` latents after ``scheduler.step``, before the edits' ``after_step``.

    Returns:
        Per job, its ``(prompts, channels, height, width)`` final latents.
    """
    first = jobs[0].settings
    guided = first.guidance > 1.0
    sizes = first.size_conditioning  # SDXL's time ids; the default for other families
    total = group.total_rows
    dtype, device = model.dtype, model.device
    cond = torch.cat([model.encode_text(job.prompts) for job in jobs])
    empty = model.uncond_context() if guided else None
    latents = [
        job.start.latent.to(device=device, dtype=dtype).expand(len(job.prompts), -1, -1, -1).clone()
        for job in jobs
    ]
    step_kwargs = [
        _step_kwargs(job.scheduler, torch.Generator("cpu").manual_seed(0)) for job in jobs
    ]
    timesteps = jobs[0].scheduler.timesteps
    batch = [job.index for job in jobs]

    def check_errors() -> None:
        if raise_errors and group.errors:
            position, error = next(iter(group.errors.items()))
            reported = job_error(error, jobs[position])
            if reported is error:
                raise error
            raise reported from error

    def null_embedding(position: int, job: _PreparedJob) -> torch.Tensor | None:
        if position in group.errors:
            return empty
        try:
            return _uncond_embedding(job.start.guide, step, empty)
        except Exception as error:  # the source's guide: its job fails alone
            group.errors[position] = error
            return empty

    with group.installed(model.unet):
        for step, t in enumerate(timesteps):
            scaled = torch.cat(
                [job.scheduler.scale_model_input(x, t) for job, x in zip(jobs, latents)]
            )
            if guided:
                # Each job's source may give its own unconditional embedding per step.
                nulls = [null_embedding(position, job) for position, job in enumerate(jobs)]
                uncond = torch.cat(
                    [
                        null.to(device=device, dtype=dtype).expand(len(job.prompts), -1, -1)
                        for job, null in zip(jobs, nulls)
                    ]
                )
                if first.separate_uncond_pass:
                    group.begin_call(step, None)
                    out_uncond = model.predict(scaled, t, uncond, sizes)
                    group.begin_call(step, slice(0, total))
                    out_cond = model.predict(scaled, t, cond, sizes)
                else:
                    group.begin_call(step, slice(total, 2 * total))
                    both = torch.cat([uncond, cond])
                    out = model.predict(torch.cat([scaled, scaled]), t, both, sizes)
                    out_uncond, out_cond = out.chunk(2)
            else:
                group.begin_call(step, slice(0, total))
                out_cond = model.predict(scaled, t, cond, sizes)
            check_errors()
            for index, job in enumerate(jobs):
                rows = group.job_rows(index)
                if guided:
                    u = out_uncond[rows]
                    noise = u + job.settings.guidance * (out_cond[rows] - u)
                else:
                    noise = out_cond[rows]
                x = job.scheduler.step(
                    noise, t, latents[index], **step_kwargs[index], return_dict=False
                )[0]
                if index not in group.errors:
                    # The source's guide and the edits' after_step are plugin code: any
                    # exception fails this job only (the others' rows are not touched).
                    try:
                        if job.start.guide is not None:
                            x = job.start.guide.after_step(x, step)
                        for edit_run in job.runs:
                            x = edit_run.after_step(x, step)
                    except Exception as error:
                        group.errors[index] = error
                latents[index] = x
            check_errors()
            raise_pending()  # a Ctrl-C/SIGTERM swallowed (in a __del__) ends the run here
            if progress is not None:
                progress(step + 1, len(timesteps), {"phase": "denoise", "jobs": batch})
    return latents
