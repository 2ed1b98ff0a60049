"""``p2p-run``: the command line, a thin layer over :mod:`p2p_framework.spec` (the typed
run), :mod:`p2p_framework.runner` and :mod:`p2p_framework.outputs`.

Results (written paths, or JSON with ``--json``) go to stdout; logs, warnings and the progress
bar to stderr. Bad input ends with a one-line ``Error: ...`` and exit status 2 (``--debug``
adds the traceback); a pipeline with a failed job exits with 1. See ``docs/cli.md``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from . import signals
from .cpu_threads import THREADS_ENV
from .errors import OptionError, P2PError, P2PWarning, PluginRunError
from .model import DTYPES
from .runner import AUTO_BATCH_ROWS, MODEL_ENV
from .spec import SHORTCUTS

#: Exit status of bad input (an unknown plugin, a bad value, a missing file...).
EXIT_USAGE = 2
#: Exit status of a pipeline with failed jobs, and of an internal error.
EXIT_FAILED = 1
#: Exit status after Ctrl-C (SIGINT).
EXIT_INTERRUPTED = 130
#: Exit status after SIGTERM.
EXIT_TERMINATED = 143


class _State:
    """Per-invocation flags the error handler needs (set by the options' callbacks)."""

    quiet = False
    debug = False


_state = _State()


def _log(message: str) -> None:
    if not _state.quiet:
        click.echo(message, err=True)


def _warn(message: str) -> None:
    click.echo(f"Warning: {message}", err=True)


def _quiet_libraries() -> None:
    """Silence the loading bars and warnings of diffusers and transformers (not with --debug)."""
    if _state.debug:
        return
    with contextlib.suppress(Exception):
        import diffusers.utils.logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    with contextlib.suppress(Exception):
        import transformers.utils.logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


class P2PGroup(click.Group):
    """The ``p2p-run`` group: one-line errors and exit statuses for every command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["p2p.argv"] = list(args)
        return super().parse_args(ctx, args)

    def main(  # type: ignore[override]
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        _state.debug = _state.quiet = False
        with signals.handling():  # SIGTERM ends a run as Ctrl-C does
            try:
                with warnings.catch_warnings():
                    # Each P2PWarning (every time, not once per place) as one "Warning:" line.
                    warnings.simplefilter("always", P2PWarning)
                    shown = warnings.showwarning

                    def show(message: Any, category: Any, *rest: Any, **kwargs: Any) -> None:
                        if issubclass(category, P2PWarning):
                            _warn(_one_line(str(message)))
                        else:
                            shown(message, category, *rest, **kwargs)

                    warnings.showwarning = show
                    result = super().main(
                        args, prog_name or "p2p-run", complete_var, standalone_mode=False, **extra
                    )
                code = result if isinstance(result, int) else 0
            except click.exceptions.NoArgsIsHelpError as error:
                click.echo(error.ctx.get_help() if error.ctx else str(error), err=True)
                code = EXIT_USAGE
            except click.ClickException as error:
                message = error.format_message()
                ctx = getattr(error, "ctx", None)
                if isinstance(error, click.UsageError) and ctx is not None:
                    message += f" (see '{ctx.command_path} --help')"
                click.echo(f"Error: {message}", err=True)
                code = error.exit_code
            except (click.exceptions.Abort, KeyboardInterrupt) as error:
                terminated = signals.pending() == signal.SIGTERM or isinstance(
                    error.__cause__ or error, signals.Terminated
                )
                if terminated:
                    click.echo("Terminated (SIGTERM); no half-written file was left.", err=True)
                    code = EXIT_TERMINATED
                else:
                    click.echo("Interrupted; no half-written file was left.", err=True)
                    code = EXIT_INTERRUPTED
            except PluginRunError as error:  # a plugin's bug: name it; exit 1 like a failed job
                if _state.debug:
                    traceback.print_exc()
                hint = "" if _state.debug else " (run with --debug for the traceback)"
                click.echo(f"Error: {_one_line(str(error))}{hint}", err=True)
                code = EXIT_FAILED
            except P2PError as error:
                if _state.debug:
                    traceback.print_exc()
                click.echo(f"Error: {_one_line(str(error))}", err=True)
                code = EXIT_USAGE
            except OSError as error:
                if _state.debug:
                    traceback.print_exc()
                where = f" ({error.filename})" if error.filename else ""
                click.echo(f"Error: {error.strerror or error}{where}", err=True)
                code = EXIT_USAGE
            except Exception as error:  # a bug: say so in one line, --debug shows where
                if _state.debug:
                    traceback.print_exc()
                hint = "" if _state.debug else " (run with --debug for the traceback)"
                click.echo(
                    f"Error: internal error: {type(error).__name__}: {_one_line(str(error))}{hint}",
                    err=True,
                )
                code = EXIT_FAILED
        if standalone_mode:
            sys.exit(code)
        return code


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- shared options ---------------------------------------------------------------------------


def _remember(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    setattr(_state, str(param.name), value)
    return value


def _verbosity(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--debug",
        is_flag=True,
        is_eager=True,
        callback=_remember,
        help="Show tracebacks and the libraries' own logs.",
    )(func)
    func = click.option(
        "-q",
        "--quiet",
        is_flag=True,
        is_eager=True,
        callback=_remember,
        help="No progress bar and no logs on stderr; errors only.",
    )(func)
    return func


#: The model options' help, then each scope's default: ``run`` (edit, generate, invert),
#: ``rerun`` and ``pipeline`` (``p2p-run run``).
_MODEL_HELP = {
    "model": "Hugging Face hub id or local diffusers folder (Stable Diffusion 1.x, 2.x or XL).",
    "revision": "Hub revision (branch, tag or commit) of --model.",
    "device": "Torch device; auto picks cuda, then mps, then cpu.",
    "dtype": "Weights' precision; auto is float16 on a GPU, float32 on the CPU "
    "(half precision needs a GPU).",
    "compile": "Run the UNet under torch.compile (CUDA graphs on a GPU), or not: the first run "
    "compiles (minutes), later steps and runs of the same shapes are faster. Results equal the "
    "eager ones up to float rounding.",
}
_MODEL_DEFAULTS = {
    "run": {
        "model": f"Default: ${MODEL_ENV}, else the embedded demo model (64 px coloured "
        "shapes). E.g. --model CompVis/stable-diffusion-v1-4",
        "revision": "Default: main. E.g. --revision fp16",
        "device": "E.g. --device cuda:1",
        "dtype": "E.g. --dtype float32",
        "compile": "Default: off.",
    },
    "rerun": {
        "model": "Default: the recorded one; give another if the folder moved. "
        "E.g. --model ./models/sd14",
        "revision": "Default: the recorded commit. E.g. --revision main",
        "device": "Default: the recorded one. E.g. --device cpu",
        "dtype": "Default: the recorded one. E.g. --dtype float32",
        "compile": "Default: as recorded.",
    },
    "pipeline": {
        "model": f"For jobs that name none. Default: the file's, else ${MODEL_ENV}, else the "
        "embedded demo model. E.g. --model ./models/sd14",
        "revision": "For jobs that name none. Default: the file's. E.g. --revision fp16",
        "device": "For jobs that name none. Default: the file's, else auto. E.g. --device cuda",
        "dtype": "For jobs that name none. Default: the file's, else auto. E.g. --dtype float16",
        "compile": "For jobs that do not say. Default: the file's `compile`. Worth it for many "
        "jobs of one size: they reuse the compiled graph.",
    },
}


def _set_threads(ctx: click.Context, param: click.Parameter, value: str) -> int:
    from .cpu_threads import use_threads

    try:
        return use_threads(value)
    except OptionError as error:
        raise click.BadParameter(error.message, ctx, param) from None


def _threads_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--threads",
        envvar=THREADS_ENV,
        show_envvar=True,
        default="auto",
        show_default=True,
        metavar="N|auto",
        expose_value=False,
        callback=_set_threads,
        help="CPU threads for PyTorch; auto takes the cores no other process is busy on "
        "(all of them on an idle machine). Another job on the same cores slows a run "
        "3-10x unless this leaves them out. E.g. --threads 1",
    )


def _model_options(scope: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--model --revision --device --dtype --compile/--no-compile --threads``, declared once; in
    ``scope`` ``run`` they have defaults, elsewhere None means "as recorded / as the file"."""
    auto = {"default": "auto", "show_default": True} if scope == "run" else {}

    def text(name: str) -> str:
        return f"{_MODEL_HELP[name]} {_MODEL_DEFAULTS[scope][name]}"

    options = [
        click.option(
            "--model",
            envvar=MODEL_ENV if scope == "run" else None,
            show_envvar=scope == "run",
            metavar="ID|DIR",
            help=text("model"),
        ),
        click.option("--revision", metavar="REV", help=text("revision")),
        click.option("--device", help=text("device"), **auto),
        click.option("--dtype", type=click.Choice(DTYPES), help=text("dtype"), **auto),
        click.option("--compile/--no-compile", "compile_unet", default=None, help=text("compile")),
        _threads_option(),
    ]

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _shortcut_options(command: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click options of :data:`p2p_framework.spec.SHORTCUTS` that ``command`` offers."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for shortcut in reversed([s for s in SHORTCUTS if command in s.commands]):
            name = "--" + shortcut.key.replace("_", "-")
            func = click.option(name, shortcut.key, help=shortcut.help, **shortcut.click)(func)
        return func

    return decorate


def _run_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--source",
            metavar="NAME",
            help="Source plugin giving the starting latent (see `p2p-run plugins --kind "
            "source`). Default: seed; with --image null-text; with --inversion the method it "
            "was made with. E.g. --source negative-prompt --set negative-prompt.image=cat.jpg",
        ),
        click.option(
            "--set",
            "assignments",
            multiple=True,
            metavar="PLUGIN.KEY=VALUE",
            help="Set any plugin option, read by its type (int, float, bool, list as a,b or "
            "'a b', dict as a=1,b=2, JSON too); `pipeline.KEY` sets a run setting. "
            "Repeatable. E.g. --set local-blend.threshold=0.4",
        ),
        click.option(
            "--out",
            type=click.Path(file_okay=False, path_type=Path),
            help="Output folder (created). Default: a new p2p-out/MODE-DATE-TIME. A folder "
            "holding another run is refused unless --overwrite. E.g. --out out/lion",
        ),
        click.option(
            "--overwrite",
            is_flag=True,
            help="Replace an --out folder that holds an earlier run, whole (when this run is "
            "done; a failed run leaves it as it was).",
        ),
        click.option(
            "--save-attention",
            is_flag=True,
            help="Also write attention.png: each prompt's per-token cross-attention maps.",
        ),
        click.option(
            "--json",
            "as_json",
            is_flag=True,
            help="Print the run record (run.json) on stdout instead of the written paths.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _job(command: str, options: dict[str, Any], **job: Any) -> dict[str, Any]:
    """The job of a ``command`` invocation: its keys, the model options and the shortcuts."""
    shortcuts = {s.key: options[s.key] for s in SHORTCUTS if command in s.commands}
    return {
        "mode": command,
        **job,
        **shortcuts,
        "model": options["model"],
        "revision": options["revision"],
        "device": options["device"],
        "dtype": options["dtype"],
        "compile": options["compile_unet"],
        "source": options["source"],
        "set": list(options["assignments"]),
        "save_attention": options["save_attention"],
    }


# -- helpers ----------------------------------------------------------------------------------


def _registry() -> Any:
    from .registry import PluginRegistry, get_registry

    obj = click.get_current_context().find_root().obj
    return obj if isinstance(obj, PluginRegistry) else get_registry()


def _argv() -> list[str]:
    root = click.get_current_context().find_root()
    return ["p2p-run", *root.meta.get("p2p.argv", [])]


def _default_out(mode: str) -> Any:
    """Claim a new ``p2p-out/MODE-DATE-TIME`` folder (``-2``, ``-3``... when it exists or
    another run started in the same second has claimed it)."""
    from .outputs import OutputError, RunFolder

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("p2p-out") / f"{mode}-{stamp}"
    candidate, n = base, 1
    while True:
        if not candidate.exists():
            try:
                return RunFolder.claim(candidate)
            except OutputError:
                if n > 100:
                    raise
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")


@contextlib.contextmanager
def _progress(label: str) -> Iterator[Callable[[int, int, dict[str, Any]], None] | None]:
    """A progress bar over diffusion steps on stderr, only on a terminal and without --quiet.

    The bar opens at the first step (after the model is loaded and the source prepared) and
    is closed on the way out, also on errors.
    """
    if _state.quiet or not sys.stderr.isatty():
        yield None
        return
    bars: list[tuple[str, Any]] = []

    def update(done: int, total: int, info: dict[str, Any]) -> None:
        # One bar per phase: the source's work (e.g. an inversion), then the denoising steps.
        phase = str(info.get("phase", "denoise"))
        if not bars or bars[-1][0] != phase:
            if bars:
                bars[-1][1].__exit__(None, None, None)
            bar = click.progressbar(
                length=total, label=f"{label}: {phase}", file=sys.stderr, show_eta=True
            )
            bars.append((phase, bar.__enter__()))
        bar = bars[-1][1]
        if "loss" in info:
            bar.label = f"{label}: {phase} (loss {float(info['loss']):.2e})"
        bar.update(done - bar.pos)

    try:
        yield update
    finally:
        if bars:
            bars[-1][1].__exit__(None, None, None)


def _warn_broken_plugins(registry: Any) -> None:
    errors = registry.errors
    if errors and not _state.quiet:
        _warn(f"{len(errors)} plugin(s) failed to load; see `p2p-run plugins`")


def _describe(spec: Any) -> str:
    edits = ", ".join(e.name for e in spec.edits) or "none"
    return (
        f"{len(spec.prompts)} prompt(s), source {spec.source.name}, edits {edits}, "
        f"{spec.settings.steps} steps"
    )


def _load_model(name: str, **kwargs: Any) -> Any:
    import torch

    from .model import load_model
    from .outputs import dtype_name

    _log(f"Loading model {name}")
    began = time.perf_counter()
    model = load_model(name, **kwargs)
    signals.raise_pending()  # a Ctrl-C swallowed while loading (in a __del__) ends the run here
    seconds = time.perf_counter() - began
    threads = f", {torch.get_num_threads()} CPU threads" if model.device.type == "cpu" else ""
    _log(f"Loaded in {seconds:.1f} s on {model.device} ({dtype_name(model.dtype)}{threads})")
    if model.compiled:
        _log(
            f"torch.compile ({model.compile_mode}): the first UNet calls compile, which takes "
            "from tens of seconds to minutes; the steps after them are fast"
        )
    return model


def _preflight(
    model: str,
    prompts: list[str],
    steps: int,
    height: int | None,
    width: int | None,
    job: str | None = None,
) -> None:
    """Check the run against a local model folder's configs before the model loads (a bad
    value ends here, exit 2) and print the warnings (words the model does not know)."""
    from .preflight import check_before_load

    warnings = check_before_load(model, prompts, steps=steps, height=height, width=width)
    for warning in warnings:
        _warn(f"job {job!r}: {warning}" if job else warning)


def _execute(spec: Any, out: Path | None, as_json: bool, overwrite: bool = False) -> None:
    from .runner import ModelCache, model_from_env, run_job

    _quiet_libraries()
    registry = _registry()
    _warn_broken_plugins(registry)
    model_name = model_from_env(spec.model)

    def loader(name: str, **kwargs: Any) -> Any:
        return _load_model(name, **kwargs)

    spec.model = model_name
    settings = spec.settings
    _preflight(model_name, spec.prompts, settings.steps, settings.height, settings.width)
    target = out if out is not None else _default_out(spec.mode)
    try:
        _log(f"Running {spec.mode}: {_describe(spec)}")
        with _progress(spec.mode) as progress:
            record, paths = run_job(
                spec,
                target,
                registry=registry,
                models=ModelCache(loader),
                progress=progress,
                command=_argv(),
                warn=_warn,
                overwrite=overwrite,
            )
    except BaseException:
        if not isinstance(target, Path):  # the default folder claimed above: give it up
            target.abort()
        raise
    out = getattr(target, "target", target)
    _log(f"Wrote {len(paths)} files to {out} in {record['timings'].get('total', 0):.1f} s")
    if as_json:
        click.echo(json.dumps(record, ensure_ascii=False))
    else:
        for path in paths:
            click.echo(str(path))


# -- commands ---------------------------------------------------------------------------------


@click.group(
    "p2p-run",
    cls=P2PGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="p2p-framework", prog_name="p2p-run")
def cli() -> None:
    """Prompt-to-Prompt image editing on diffusers models, from the command line.

    \b
    Examples:
      p2p-run edit --model CompVis/stable-diffusion-v1-4 \\
          --prompt "a painting of a squirrel eating a burger" \\
          --target "a painting of a lion eating a burger" \\
          --cross-replace default=1.0,lion=0.4 --blend "squirrel lion" --out out/lion
      p2p-run generate --prompt "a purple triangle on a dotted green background" --seed 1
      p2p-run invert --model CompVis/stable-diffusion-v1-4 --image cat.jpg \\
          --prompt "a cat sitting next to a mirror" --out cat.p2pinv
      p2p-run plugins
      p2p-run run jobs.toml --json
      p2p-run dataset spec.toml --out out/pairs --ray local --workers 2
      p2p-run serve                      # a web page (pip install 'p2p-framework[ui]')

    Exit status: 0 success, 1 failed pipeline job or internal error, 2 bad input,
    130 interrupted.
    """


@cli.command("edit")
@click.option(
    "--prompt",
    metavar="TEXT",
    help="Source prompt (image 0). Required, except with --inversion, whose prompt is the "
    'source prompt. E.g. --prompt "a cat sitting next to a mirror"',
)
@click.option(
    "--target",
    "targets",
    multiple=True,
    metavar="TEXT",
    help="Target prompt, an edit of the source; repeatable (one image each). "
    'E.g. --target "a tiger sitting next to a mirror"',
)
@click.option(
    "--edit",
    "edits",
    multiple=True,
    metavar="NAME",
    help="Edit plugin; repeatable, applied in order. Default: replace when every target has "
    "the source's word count, else refine. E.g. --edit refine --edit reweight",
)
@_shortcut_options("edit")
@_run_options
@_model_options("run")
@_verbosity
def edit_command(
    prompt: str | None, targets: tuple[str, ...], edits: tuple[str, ...], **options: Any
) -> None:
    """Edit an image by editing its prompt (Prompt-to-Prompt).

    Writes source.png, target-1.png ..., grid.png (all side by side, captioned), with
    --save-attention attention.png, and run.json (everything needed to rerun it).

    \b
    Examples (the first two on the demo model, in its words: docs/demo-model.md):
      p2p-run edit --prompt "a red circle and a blue square on a yellow background" \\
          --target "a red star and a blue square on a yellow background" \\
          --blend "circle star"
      p2p-run edit --prompt "a red circle on a yellow background" \\
          --target "a red circle on a striped yellow background"
      p2p-run edit --model CompVis/stable-diffusion-v1-4 --prompt soup \\
          --target "pea soup with croutons" --edit refine --reweight croutons=3
      p2p-run edit --model CompVis/stable-diffusion-v1-4 --inversion cat.p2pinv \\
          --target "a tiger sitting next to a mirror" --self-replace 0.5 \\
          --blend "cat tiger" --reweight tiger=2
    """
    from .spec import spec_from_job

    job = _job("edit", options, prompt=prompt, targets=list(targets), edits=list(edits))
    spec = spec_from_job(job, _registry())
    _execute(spec, options["out"], options["as_json"], options["overwrite"])


@cli.command("generate")
@click.option(
    "--prompt",
    "prompts",
    multiple=True,
    required=True,
    metavar="TEXT",
    help="Prompt; repeatable, one image each, all from the same starting noise. "
    'E.g. --prompt "a cat on a mat"',
)
@_shortcut_options("generate")
@_run_options
@_model_options("run")
@_verbosity
def generate_command(prompts: tuple[str, ...], **options: Any) -> None:
    """Generate images without editing (same loading and seeding as `edit`).

    Writes image-1.png ..., grid.png when there are several prompts, and run.json. Each image
    is what the model makes for that prompt and seed on its own.

    \b
    Example (demo model):
      p2p-run generate --prompt "a red circle on a blue background" \\
          --prompt "a red square on a blue background" --seed 1
    """
    from .spec import spec_from_job

    job = _job("generate", options, prompts=list(prompts))
    spec = spec_from_job(job, _registry())
    _execute(spec, options["out"], options["as_json"], options["overwrite"])


@cli.command("rerun")
@click.argument("record", type=click.Path(path_type=Path), metavar="RUN.JSON")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder. Default: a new p2p-out/MODE-DATE-TIME. E.g. --out out/again",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an --out folder that holds an earlier run, whole, when this run is done.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the new run record instead of the paths."
)
@_model_options("rerun")
@_verbosity
def rerun_command(
    record: Path, out: Path | None, overwrite: bool, as_json: bool, **options: Any
) -> None:
    """Run again what a run.json records: same model, prompts, plugins, options and settings.

    On the same machine, device and library versions the images are identical, byte for byte.
    RUN.JSON may also be the folder that holds it.

    \b
    Example:
      p2p-run rerun out/lion/run.json --out out/lion-again
    """
    from .spec import RunSpec, read_record

    spec = RunSpec.from_json(read_record(record), _registry())
    if options["model"]:
        spec.model, spec.revision, spec.identity = options["model"], None, None
    spec.revision = options["revision"] or spec.revision
    spec.device = options["device"] or spec.device
    spec.dtype = options["dtype"] or spec.dtype
    spec.compile = spec.compile if options["compile_unet"] is None else options["compile_unet"]
    _execute(spec, out, as_json, overwrite)


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of text.")
@click.option(
    "--kind",
    type=click.Choice(["edit", "source", "filter"]),
    help="List only edits, sources or filters. Default: all. E.g. --kind filter",
)
@_verbosity
def plugins_command(as_json: bool, kind: str | None, **_: Any) -> None:
    """List every plugin: kind, package, version and options (name, type, default, help).

    Plugins that failed to load are reported as warnings on stderr.

    \b
    Example:
      p2p-run plugins --kind edit
    """
    from .outputs import json_ready

    registry = _registry()
    infos = registry.plugins(kind)
    for error in registry.errors:
        _warn(str(error))
    if as_json:
        click.echo(json.dumps([json_ready(info.as_dict()) for info in infos], indent=2))
        return
    for info in infos:
        click.echo(f"{info.name} ({info.kind}) from {info.package} {info.version}")
        if info.summary:
            click.echo(f"    {info.summary}")
        for option in info.options:
            default = "required" if option.required else f"default {option.default!r}"
            # A filter's options are keys of its [[filters]] table in a dataset spec.
            where = f"--set {info.name}." if info.kind != "filter" else f"[[filters]] {info.name}: "
            click.echo(f"    {where}{option.name}: {option.type}, {default}")
            if option.help:
                click.echo(f"        {option.help}")


def _batch_rows(ctx: click.Context, param: click.Parameter, value: Any) -> int | str:
    if value is None or str(value).strip().lower() == "auto":
        return "auto"
    try:
        rows = int(value)
    except ValueError:
        rows = 0
    if rows < 1:
        raise click.BadParameter(f"expected a positive integer or auto, got {value!r}")
    return rows


def _pipeline_warnings(pipeline: Any, registry: Any, options: dict[str, Any]) -> None:
    """Each job's warnings before any model loads; a job whose check fails is left to fail
    alone when it runs (with the same message), the others go on."""
    from .pipeline_file import pipeline_job_spec
    from .runner import model_from_env

    overrides = {key: options[key] for key in ("model", "revision", "device", "dtype")}
    for index in range(len(pipeline.jobs)):
        try:
            spec = pipeline_job_spec(pipeline, index, registry, overrides=overrides)
            settings = spec.settings
            _preflight(
                model_from_env(spec.model),
                spec.prompts,
                settings.steps,
                settings.height,
                settings.width,
                pipeline.job_name(index),
            )
        except (P2PError, OSError):
            continue


@cli.command("run")
@click.argument("pipeline_file", type=click.Path(path_type=Path), metavar="PIPELINE.toml")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the jobs' folders (OUT/JOB-NAME) of jobs without their own `out`. "
    "Default: the file's `out`, else p2p-out/FILE-STEM. E.g. --out out/batch",
)
@click.option(
    "--batch-rows",
    default="auto",
    show_default=True,
    callback=_batch_rows,
    metavar="N|auto",
    help="Most UNet rows per batch: jobs that share a model, steps, guidance on/off, size "
    "and scheduler run in one UNet batch of up to N rows (a job of P prompts takes 2P rows "
    "with guidance; a larger job runs alone); 1 runs the jobs one at a time. auto: "
    f"{AUTO_BATCH_ROWS['cuda']} on a GPU; on the CPU "
    f"{AUTO_BATCH_ROWS['cpu']}, since batching gains little there (docs/benchmarks.md). "
    "Each job's images are the same either way, up to float rounding. E.g. --batch-rows 32",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace job folders that hold an earlier run (each when its job is done). Without "
    "it such a job fails, its folder untouched, and the others run.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object per job on stdout (its run record, or its error).",
)
@_model_options("pipeline")
@_verbosity
def run_command(
    pipeline_file: Path,
    out: Path | None,
    batch_rows: int | str,
    overwrite: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """Run the jobs of a pipeline file (TOML), loading each model once and batching the jobs
    that can share a UNet batch (--batch-rows).

    A failing job is reported and the others still run; the exit status is 1 if any failed.
    The format is in docs/cli.md.

    \b
    Example file:
      model = "CompVis/stable-diffusion-v1-4"
      [defaults]
      steps = 50
      [[jobs]]
      name = "lion"
      prompt = "a painting of a squirrel eating a burger"
      targets = ["a painting of a lion eating a burger"]
      cross_replace = { default = 1.0, lion = 0.4 }
      blend = "squirrel lion"

    \b
    Example:
      p2p-run run jobs.toml --out out/batch --json
    """
    from .pipeline_file import load_pipeline
    from .runner import JobOutcome, ModelCache, run_pipeline

    _quiet_libraries()
    registry = _registry()
    _warn_broken_plugins(registry)
    pipeline = load_pipeline(pipeline_file)
    _pipeline_warnings(pipeline, registry, options)

    def loader(name: str, **kwargs: Any) -> Any:
        return _load_model(name, **kwargs)

    bars = contextlib.ExitStack()

    def on_start(index: int, total: int, name: str) -> None:
        bars.close()
        _log(f"[{index + 1}/{total}] {name}")

    def progress(name: str) -> Callable[[int, int, dict[str, Any]], None] | None:
        bars.close()  # one bar at a time: the previous job's (or batch's) is done
        return bars.enter_context(_progress(name))

    def on_done(outcome: JobOutcome) -> None:
        bars.close()
        if outcome.ok:
            _log(f"    done: {len(outcome.paths)} files in {outcome.out}")
        else:
            click.echo(
                f"Error: job {outcome.name!r} failed: {_one_line(outcome.error or '')}", err=True
            )
        if as_json:
            click.echo(json.dumps(outcome.as_line(), ensure_ascii=False))
        elif outcome.ok:
            for path in outcome.paths:
                click.echo(str(path))

    with bars:
        outcomes = run_pipeline(
            pipeline,
            registry=registry,
            overrides={
                "model": options["model"],
                "revision": options["revision"],
                "device": options["device"],
                "dtype": options["dtype"],
                "compile": options["compile_unet"],
            },
            out_root=out,
            models=ModelCache(loader),
            on_start=on_start,
            on_done=on_done,
            progress=progress,
            command=_argv(),
            warn=_warn,
            max_batch_rows=batch_rows,
            overwrite=overwrite,
        )
    failed = [o.name for o in outcomes if not o.ok]
    _log(f"{len(outcomes) - len(failed)} of {len(outcomes)} job(s) succeeded")
    if failed:
        click.get_current_context().exit(EXIT_FAILED)


def _ray_option(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not value.strip():
        raise click.BadParameter("expected auto, local, off or a Ray address")
    return value.strip()


@cli.command("dataset")
@click.argument("spec_file", type=click.Path(path_type=Path), metavar="SPEC.toml")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The dataset folder: manifest.jsonl and shards/*.parquet. A folder holding this "
    "spec's dataset is finished (only missing items run); another spec's is refused. "
    "E.g. --out out/pairs",
)
@click.option(
    "--ray",
    "ray_address",
    default="auto",
    show_default=True,
    callback=_ray_option,
    metavar="auto|local|off|ADDRESS",
    help="Where the work runs: auto is a Ray cluster named by $RAY_ADDRESS, else a local Ray, "
    "else (Ray not installed) this process; local starts a private local Ray; off runs in "
    "this process; ADDRESS joins a running cluster (`ray start --head` prints it). "
    "E.g. --ray 10.0.0.5:6379",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Ray actors, each holding one loaded model (on a GPU machine: one per GPU). On the "
    "CPU each takes an equal share of the cores. E.g. --workers 8",
)
@click.option(
    "--gpus-per-worker",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="GPUs each Ray actor takes (0: CPU actors). E.g. --gpus-per-worker 1",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@_threads_option()
@_verbosity
def dataset_command(
    spec_file: Path,
    out: Path,
    ray_address: str,
    workers: int,
    gpus_per_worker: float,
    as_json: bool,
    **_: Any,
) -> None:
    """Make an edit dataset: every item of the spec's items file, several samples each with
    values drawn from the spec's ranges, scored and filtered, written to Parquet shards.

    Resumable: the same command again after an interruption (Ctrl-C, a killed machine)
    runs only the items the manifest lacks, and never writes a sample twice. A failing
    sample is recorded with its error (exit status 1) and the others go on. The format is in
    docs/dataset.md.

    \b
    Example:
      p2p-run dataset docs/examples/dataset/spec.toml --out out/pairs --ray local --workers 2
    """
    from .dataset import RAY_HINT, DatasetProgress, load_dataset_spec, run_dataset

    _quiet_libraries()
    registry = _registry()
    _warn_broken_plugins(registry)
    spec = load_dataset_spec(spec_file, registry)
    began = time.perf_counter()

    def on_start(engine: str, pending: int, total: int) -> None:
        if engine == "process" and ray_address == "auto":
            _log(f"Ray is not installed: running in this process; to scale out, {RAY_HINT}")
        where = f"Ray, {workers} worker(s)" if engine == "ray" else "this process"
        done = total - pending
        _log(f"Dataset: {pending} of {total} item(s) to run ({done} done before), on {where}")

    def on_item(progress: DatasetProgress) -> None:
        workers_text = ", ".join(
            f"{w} {n} ({60 * n / max(progress.busy.get(w, 0.0), 1e-9):.1f}/min busy)"
            for w, n in sorted(progress.workers.items())
        )
        _log(
            f"[{progress.items_done}/{progress.items_total} items] kept {progress.kept} of "
            f"{progress.samples} samples ({progress.failed} failed), "
            f"{progress.samples_per_minute:.1f} samples/min; per worker: {workers_text}"
        )

    summary = run_dataset(
        spec,
        out,
        ray=ray_address,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        on_item=on_item,
        on_start=on_start,
        loader=_load_model,
        registry=registry,
    )
    result = summary.as_json()
    if summary.items_run == 0:
        _log(f"Nothing to do: {out} holds every item of the spec")
    else:
        _log(
            f"Done in {time.perf_counter() - began:.1f} s: {result['items_run']} item(s), "
            f"{result['samples']} samples, kept {result['kept']}, dropped "
            f"{result['dropped']}, failed {result['failed']}; "
            f"{result['samples_per_minute']:.1f} samples/min; "
            f"{result['shards_written']} shard(s) in {out}"
        )
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
    else:
        click.echo(str(out))
    if summary.progress.failed:
        click.echo(
            f"Error: {summary.progress.failed} sample(s) failed; their errors are in "
            f"{out / 'manifest.jsonl'}",
            err=True,
        )
        click.get_current_context().exit(EXIT_FAILED)


@cli.command("invert")
@click.option(
    "--image",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The photo to invert. E.g. --image cat.jpg",
)
@click.option(
    "--prompt",
    required=True,
    metavar="TEXT",
    help="What the photo shows: the source prompt of the edits to come. "
    'E.g. --prompt "a cat sitting next to a mirror"',
)
@click.option(
    "--method",
    default="null-text",
    show_default=True,
    metavar="NAME",
    help="Inversion method: any source that can invert (see `p2p-run plugins --kind source`): "
    "null-text (the paper's, slow), negative-prompt (fast), direct, ddim, or a plugin's. "
    "E.g. --method negative-prompt",
)
@click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="METHOD.KEY=VALUE",
    help="A method option, read by its type; repeatable. E.g. --set null-text.num_inner_steps=5",
)
@click.option(
    "--crop",
    metavar="L,R,T,B",
    help="Pixels to cut off the photo's left, right, top and bottom edges first. "
    "E.g. --crop 0,0,100,0",
)
@click.option(
    "--steps",
    type=int,
    default=50,
    show_default=True,
    help="Diffusion steps; the edits must use the same. E.g. --steps 50",
)
@click.option(
    "--guidance",
    type=float,
    default=7.5,
    show_default=True,
    help="Guidance scale of the edits to come (null-text optimises for it). E.g. --guidance 7.5",
)
@click.option(
    "--height",
    type=int,
    help="Height in pixels, a multiple of the model's VAE scale factor (8 for SD, 4 for the "
    "demo model). Default: the model's size. E.g. --height 512",
)
@click.option(
    "--width",
    type=int,
    help="Width in pixels, a multiple of the model's VAE scale factor (as --height). "
    "Default: the model's size. E.g. --width 512",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The .p2pinv file to write (atomically). Default: IMAGE-STEM.METHOD.p2pinv in the "
    "current folder. E.g. --out cat.p2pinv",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the inversion's summary as JSON instead of the path.",
)
@_model_options("run")
@_verbosity
def invert_command(
    image: Path,
    prompt: str,
    method: str,
    assignments: tuple[str, ...],
    crop: str | None,
    steps: int,
    guidance: float,
    height: int | None,
    width: int | None,
    out: Path | None,
    as_json: bool,
    model: str | None,
    revision: str | None,
    device: str,
    dtype: str,
    compile_unet: bool | None,
    **_: Any,
) -> None:
    """Invert a real photo once, to edit it many times with `edit --inversion FILE`.

    \b
    Example:
      p2p-run invert --model CompVis/stable-diffusion-v1-4 --image cat.jpg \\
          --prompt "a cat sitting next to a mirror" --out cat.p2pinv
      p2p-run edit --model CompVis/stable-diffusion-v1-4 --inversion cat.p2pinv \\
          --target "a tiger sitting next to a mirror" --blend "cat tiger"

    Photos need real weights: the demo model's VAE cannot represent them (a warning gives
    the round trip's dB).
    """
    from .inversion import invert, inverting_source
    from .runner import model_from_env
    from .spec import JobError, parse_assignments

    _quiet_libraries()
    options: dict[str, Any] = {}
    for plugin, key, value in parse_assignments(list(assignments)):
        if plugin != method:
            raise JobError(f"--set {plugin}.{key}: this inversion uses method {method!r}")
        options[key] = value  # text, read by the option's type as for `edit --set`
    # The source, its options validated, before the model loads (one code path: invert()).
    source = inverting_source(
        method, options, image_label=str(image), crop=crop, registry=_registry()
    )
    out = out if out is not None else Path(f"{image.stem}.{method}.p2pinv")
    from .outputs import prepare_output_dir

    prepare_output_dir(out.parent if str(out.parent) else Path("."))
    if steps >= 1:  # invert() itself refuses fewer, with its own message
        _preflight(model_from_env(model), [prompt], steps, height, width)
    loaded = _load_model(
        model_from_env(model),
        device=device,
        dtype=dtype,
        revision=revision,
        compile=bool(compile_unet),
    )
    _log(f"Inverting {image} with {method}, {steps} steps")
    with _progress(method) as progress:
        inversion = invert(
            loaded,
            image,
            prompt,
            source,
            num_steps=steps,
            guidance=guidance,
            height=height,
            width=width,
            progress=progress,
        )
    path = inversion.save(out)
    _log(f"Wrote {path} in {inversion.stats.get('seconds', 0):.1f} s")
    if as_json:
        click.echo(json.dumps({"path": str(path), **inversion.summary()}, ensure_ascii=False))
    else:
        click.echo(str(path))


@cli.command("serve")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. 127.0.0.1: this machine only; 0.0.0.0: every network "
    "interface (anyone who can reach it can run edits on this machine's GPU: no login).",
)
@click.option("--port", type=int, default=7860, show_default=True, help="TCP port. E.g. 8080")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Inversion cache folder. Default: the command line's ($P2P_FRAMEWORK_CACHE_DIR, "
    "else ~/.cache/p2p-framework/inversions), so photos inverted by `p2p-run edit --image` "
    "are reused by the page and the other way round.",
)
@click.option(
    "--max-steps",
    type=click.IntRange(1, 1000),
    default=200,
    show_default=True,
    help="Most diffusion steps a page run may ask for.",
)
@_model_options("run")
@_verbosity
def serve_command(
    host: str,
    port: int,
    cache_dir: Path | None,
    max_steps: int,
    model: str | None,
    revision: str | None,
    device: str,
    dtype: str,
    compile_unet: bool | None,
    **_: Any,
) -> None:
    """Edit photos in the browser: a Gradio page over the Python API.

    Upload a photo (or generate from a seed), write target prompts, move the sliders; the
    photo is inverted once (through the inversion cache) and every later edit of it runs
    only the edit. Runs queue: one at a time on the model. Needs the optional dependency
    Gradio: pip install 'p2p-framework[ui]'.

    \b
    Examples:
      p2p-run serve                      # the demo model, http://127.0.0.1:7860
      p2p-run serve --model CompVis/stable-diffusion-v1-4 --port 8080
    """
    from .runner import model_from_env
    from .web.app import import_gradio, serve
    from .web.service import EditService

    _quiet_libraries()
    service = EditService(
        model_from_env(model),
        revision=revision,
        device=device,
        dtype=dtype,
        compile=bool(compile_unet),
        registry=_registry(),
        cache_dir=cache_dir,
        loader=_load_model,
        max_steps=max_steps,
    )
    try:
        import_gradio(service)  # a missing extra ends here, before the model loads
        if host not in ("127.0.0.1", "localhost", "::1"):
            _warn(
                f"serving on {host}: anyone who can reach this address and port can run "
                "edits on this machine (and its GPU); there is no login"
            )
        service.load()
        shown = f"[{host}]" if ":" in host else host
        _log(f"Serving on http://{shown}:{port} (Ctrl-C stops)")
        serve(service, host=host, port=port, block=True)
    finally:
        service.close()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point of ``p2p-run``."""
    cli.main(args=argv, prog_name="p2p-run")


if __name__ == "__main__":  # pragma: no cover
    main()
