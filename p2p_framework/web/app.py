"""The Gradio page of ``p2p-run serve``: :func:`build_app` and :func:`serve`.

Gradio is an optional dependency (``pip install 'p2p-framework[ui]'``), imported here only.
The handlers are the methods of :class:`Page`; each takes what the controls hold and returns
what the page shows, and the work is :class:`~p2p_framework.web.service.EditService`'s. The
controls of every registered edit and inversion method are generated from the plugin's
declared options (:mod:`p2p_framework.web.controls`), so a third-party plugin appears on the
page without code of its own here.

The run handler is a coroutine that runs the edit in a worker thread: when Gradio cancels it
(the Stop button, or a closed page), it sets the run's cancel event, and the run stops at its
next step (the per-step progress callback raises). Gradio's queue lets one run at a time use
the model (``concurrency_limit=1``), and the service's lock keeps it so while a cancelled
run reaches its next step.
"""

from __future__ import annotations

import asyncio
import contextvars
import html
import os
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import P2PError
from .controls import Control
from .service import EditForm, EditService, RunCancelled

#: The pip extra that brings the web page's dependencies.
EXTRA_HINT = "pip install 'p2p-framework[ui]'"

#: Start choices of the page: label -> :attr:`EditForm.start`.
START_CHOICES = [
    ("Generate from a seed", "seed"),
    ("Invert a photo", "photo"),
    ("Saved inversion (.p2pinv)", "inversion"),
]


def import_gradio(service: EditService | None = None) -> Any:
    """``gradio``, or a :class:`P2PError` saying how to install it. With ``service``,
    Gradio's uploads and cache go into the service's folder (unless ``$GRADIO_TEMP_DIR``
    says otherwise; Gradio reads it on import), removed with it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    if service is not None:
        os.environ.setdefault("GRADIO_TEMP_DIR", str(service.workdir / "gradio"))
    try:
        import gradio
    except ImportError as error:
        raise P2PError(
            f"p2p-run serve needs Gradio, an optional dependency: {EXTRA_HINT} ({error})"
        ) from None
    return gradio


def _message(kind: str, text: str) -> str:
    """A status line for the page (HTML-escaped: a message may quote user text)."""
    return f"**{kind}:** {html.escape(text, quote=False)}"


class Page:
    """The page's handlers over one :class:`EditService` (what Gradio calls).

    Args:
        service: the engine.
        upload_root: the only folder uploads may come from (Gradio's upload folder); None:
            any file Gradio hands over.
        log: where a cancelled or failed run is reported (default: stderr).
    """

    def __init__(
        self,
        service: EditService,
        *,
        upload_root: str | Path | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.service = service
        self.upload_root = Path(upload_root).resolve() if upload_root else None
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.edit_controls = service.edit_controls()
        self.method_controls = service.method_controls()
        #: The order of :meth:`run`'s arguments: the form's fields, then per edit a "use"
        #: flag and its controls, then per method its controls.
        self.edit_names = list(self.edit_controls)
        self.method_names = list(self.method_controls)

    # -- inputs ------------------------------------------------------------------------------
    def _upload(self, file: Any) -> tuple[str, str] | None:
        """``(path, own name)`` of an uploaded file, refused outside the upload folder."""
        if file is None:
            return None
        path = Path(getattr(file, "name", None) or str(file))
        if self.upload_root is not None and not path.resolve().is_relative_to(self.upload_root):
            raise P2PError("that file was not uploaded to this page")
        return str(path), path.name

    def photo_uploaded(self, file: Any) -> tuple[str | None, str, Any, str]:
        """A photo was uploaded: ``(stored path, own name, preview, status)``."""
        try:
            upload = self._upload(file)
            if upload is None:
                return None, "", None, ""
            stored, preview = self.service.accept_photo(*upload)
        except P2PError as error:
            return None, "", None, _message("Error", str(error))
        return stored, upload[1], preview, f"Photo {html.escape(upload[1])} ready."

    def inversion_uploaded(
        self, file: Any, prompt: str, steps: float, guidance: float, height: Any, width: Any
    ) -> tuple[Any, ...]:
        """A ``.p2pinv`` was uploaded: ``(stored path, own name, source prompt, steps,
        guidance, height, width, status)``: the prompt and settings are the file's (an
        inversion fits only those)."""
        unchanged = (prompt, steps, guidance, height, width)
        try:
            upload = self._upload(file)
            if upload is None:
                return None, "", *unchanged, ""
            facts = self.service.accept_inversion(*upload)
        except P2PError as error:
            return None, "", *unchanged, _message("Error", str(error))
        note = (
            f"Inversion {html.escape(facts.name)} ready ({facts.method}, {facts.steps} steps, "
            f"{facts.width}x{facts.height} px)."
        )
        settings = (facts.prompt, facts.steps, facts.guidance, facts.height, facts.width)
        return facts.path, facts.name, *settings, note

    def form(self, values: list[Any]) -> EditForm:
        """An :class:`EditForm` from :meth:`run`'s arguments (see :meth:`inputs_order`)."""
        names = self.form_names()
        fields = dict(zip(names, values[: len(names)]))
        rest = list(values[len(names) :])
        extra_edits, edit_options = [], {}
        for name in self.edit_names:
            use, rest = rest[0], rest[1:]
            controls = self.edit_controls[name]
            edit_options[name] = {c.option: v for c, v in zip(controls, rest)}
            rest = rest[len(controls) :]
            if use:
                extra_edits.append(name)
        method_options: dict[str, Any] = {}
        for name in self.method_names:
            controls = self.method_controls[name]
            if name == fields.get("method"):
                method_options = {c.option: v for c, v in zip(controls, rest)}
            rest = rest[len(controls) :]
        size = self.service.model.default_size
        # The model's own size (the fields' initial value) is "not given", as on the command
        # line: the run and its command then leave --height/--width out.
        height, width = (
            None if value in (None, "", 0, size) else value
            for value in (fields.pop("height", None), fields.pop("width", None))
        )
        return EditForm(
            **fields,
            height=height,
            width=width,
            extra_edits=extra_edits,
            edit_options=edit_options,
            method_options=method_options,
        )

    @staticmethod
    def form_names() -> list[str]:
        """The :class:`EditForm` fields :meth:`run` takes first, in order."""
        return [
            "start",
            "photo",
            "photo_name",
            "inversion",
            "inversion_name",
            "method",
            "prompt",
            "targets",
            "edit",
            "cross_replace",
            "cross_replace_words",
            "self_replace",
            "steps",
            "guidance",
            "seed",
            "height",
            "width",
            "scheduler",
            "attention",
        ]

    # -- a run -------------------------------------------------------------------------------
    def run_sync(
        self,
        values: list[Any],
        progress: Callable[[int, int, dict[str, Any]], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> tuple[str, list[tuple[str, str]] | None, str | None, str, str | None]:
        """Run the form: ``(status, gallery, attention maps, command, run.json)``. Bad input
        gives a one-line status and None/empty results, never a traceback."""
        try:
            outcome = self.service.run(self.form(values), progress, cancel)
        except RunCancelled as stop:
            self.log(f"p2p-run serve: run {stop}")
            raise
        except (P2PError, OSError) as error:
            text = " ".join(str(error).split()) or type(error).__name__
            return _message("Error", text), None, None, "", None
        except Exception as error:  # a bug: one line on the page, the traceback in the log
            traceback.print_exc()
            text = f"internal error: {type(error).__name__}: {' '.join(str(error).split())}"
            return _message("Error", text), None, None, "", None
        lines = [f"Done in {outcome.seconds:.1f} s."]
        if outcome.inversion == "reused":
            lines.append("Inversion reused from the cache (only the edit ran).")
        elif outcome.inversion == "computed":
            lines.append(
                f"Inversion computed in {outcome.inversion_seconds or 0:.1f} s and cached: "
                "the next edits of this photo and prompt reuse it."
            )
        elif outcome.inversion == "file":
            lines.append("Started from the saved inversion.")
        lines += [_message("Warning", w) for w in outcome.warnings]
        gallery = [(str(path), caption) for path, caption in outcome.images]
        attention = str(outcome.attention) if outcome.attention else None
        return "\n\n".join(lines), gallery, attention, outcome.command, str(outcome.record)

    async def run(self, *values: Any, progress: Any = None) -> tuple[Any, ...]:
        """The Run button: :meth:`run_sync` in a worker thread; a cancelled request sets
        the run's cancel event, so it stops at its next step."""
        cancel = threading.Event()

        def report(done: int, total: int, info: dict[str, Any]) -> None:
            if progress is not None:
                phase = "Inverting the photo" if info.get("phase") == "source" else "Editing"
                progress((done, total), desc=phase, unit="steps")

        context = contextvars.copy_context()  # Gradio's progress looks up the request there
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(
            None, context.run, self.run_sync, list(values), report, cancel
        )
        try:
            return await future
        except asyncio.CancelledError:
            cancel.set()
            raise
        except RunCancelled:
            return (_message("Stopped", "the run was cancelled"), None, None, "", None)


def _component(gr: Any, control: Control) -> Any:
    """The Gradio component of a generated :class:`Control`."""
    common = {"label": control.label, "info": control.info, "elem_id": _elem_id(control.key)}
    if control.kind == "checkbox":
        return gr.Checkbox(value=control.default, **common)
    if control.kind == "slider":
        return gr.Slider(
            minimum=control.minimum,
            maximum=control.maximum,
            value=control.default,
            step=control.step,
            **common,
        )
    if control.kind == "number":
        return gr.Number(
            value=control.default,
            minimum=control.minimum,
            maximum=control.maximum,
            precision=0 if control.integer else None,
            **common,
        )
    if control.kind == "dropdown":
        choices = [("none" if c is None else str(c), c) for c in control.choices]
        return gr.Dropdown(choices=choices, value=control.default, **common)
    if control.kind == "checkboxgroup":
        return gr.CheckboxGroup(choices=list(control.choices), value=control.default, **common)
    placeholder = "required" if control.required else None
    return gr.Textbox(value=control.default, placeholder=placeholder, **common)


def _elem_id(key: str) -> str:
    return "opt-" + "".join(c if c.isalnum() else "-" for c in key)


def build_app(service: EditService, *, upload_root: str | Path | None = None) -> Any:
    """The Gradio ``Blocks`` of the page over ``service``, its queue set to one run at a
    time. ``upload_root``: Gradio's upload folder (default: Gradio's own)."""
    gr = import_gradio()
    from gradio.utils import get_upload_folder

    page = Page(service, upload_root=upload_root or get_upload_folder())
    model = service.model
    size = int(model.default_size)
    methods = page.method_names
    default_method = "null-text" if "null-text" in methods else (methods[0] if methods else None)
    from ..model import SCHEDULERS
    from ..preflight import is_demo_model

    shown = (
        "the demo model (coloured shapes; docs/demo-model.md)"
        if is_demo_model(service.model_name)
        else service.model_name
    )

    with gr.Blocks(
        title="p2p-run serve", analytics_enabled=False, delete_cache=(3600, 3600)
    ) as app:
        gr.Markdown(
            "## Prompt-to-Prompt editing\n"
            f"Model: `{shown}` ({size} px). Invert a photo once, then "
            "edit it many times: moving a slider re-runs only the edit."
        )
        photo_path, photo_name = gr.State(None), gr.State("")
        inversion_path, inversion_name = gr.State(None), gr.State("")
        with gr.Row():
            with gr.Column(scale=1):
                start = gr.Radio(START_CHOICES, value="seed", label="Start from", elem_id="start")
                with gr.Group(visible=False) as photo_group:
                    photo = gr.File(
                        label="Photo", file_types=["image"], type="filepath", elem_id="photo"
                    )
                    photo_view = gr.Image(
                        label="As the model sees it",
                        interactive=False,
                        height=160,
                        elem_id="photo-view",
                    )
                    method = gr.Dropdown(
                        methods, value=default_method, label="Inversion method", elem_id="method"
                    )
                    method_groups, method_inputs = [], []
                    with gr.Accordion("Inversion options", open=False):
                        for name in methods:
                            with gr.Group(visible=name == default_method) as group:
                                for control in page.method_controls[name]:
                                    method_inputs.append(_component(gr, control))
                            method_groups.append(group)
                with gr.Group(visible=False) as inversion_group:
                    inversion = gr.File(
                        label="Saved inversion (.p2pinv, from p2p-run invert)",
                        file_types=[".p2pinv"],
                        type="filepath",
                        elem_id="inversion",
                    )
                seed = gr.Number(8888, precision=0, label="Seed", minimum=0, elem_id="seed")
                prompt = gr.Textbox(
                    label="Source prompt",
                    placeholder="what the photo shows, e.g. a blue circle on a green background",
                    elem_id="prompt",
                )
                targets = gr.Textbox(
                    label="Target prompts (one per line)", lines=2, elem_id="targets"
                )
                edit = gr.Dropdown(
                    [("auto (replace, or refine when words are added)", "auto")]
                    + [(n, n) for n in page.edit_names],
                    value="auto",
                    label="Edit",
                    elem_id="edit",
                )
                cross = gr.Slider(
                    0, 1, 0.8, step=0.05, label="Cross-replace steps", elem_id="cross-replace"
                )
                cross_words = gr.Textbox(
                    label="Per-word cross-replace",
                    placeholder="lion=0.4, or lion=0.2:0.6",
                    elem_id="cross-replace-words",
                )
                self_replace = gr.Slider(
                    0, 1, 0.4, step=0.05, label="Self-replace steps", elem_id="self-replace"
                )
                edit_inputs: list[Any] = []
                gr.Markdown("**Edits to add** (each plugin's options, from its declaration)")
                for name in page.edit_names:
                    summary = service.summary(name)
                    with gr.Accordion(f"{name}: {summary}", open=False):
                        use = gr.Checkbox(False, label=f"use {name}", elem_id=f"use-{name}")
                        edit_inputs.append(use)
                        for control in page.edit_controls[name]:
                            component = _component(gr, control)
                            edit_inputs.append(component)
                            if control.required and control.kind == "text":
                                # Filling in a required option turns the edit on.
                                component.input(
                                    lambda text, on: on or bool(str(text).strip()),
                                    [component, use],
                                    use,
                                    queue=False,
                                )
                with gr.Accordion("Advanced", open=False):
                    steps = gr.Slider(
                        1, service.max_steps, 50, step=1, label="Steps", elem_id="steps"
                    )
                    guidance = gr.Slider(0, 20, 7.5, step=0.5, label="Guidance", elem_id="guidance")
                    with gr.Row():
                        height = gr.Number(size, precision=0, label="Height (px)", minimum=1)
                        width = gr.Number(size, precision=0, label="Width (px)", minimum=1)
                    scheduler = gr.Dropdown(
                        list(SCHEDULERS), value="ddim", label="Scheduler (inversion needs ddim)"
                    )
                    attention = gr.Checkbox(True, label="Attention maps per token")
                with gr.Row():
                    run = gr.Button("Run", variant="primary", elem_id="run")
                    stop = gr.Button("Stop", elem_id="stop")
            with gr.Column(scale=1):
                status = gr.Markdown(elem_id="status")
                gallery = gr.Gallery(
                    label="Source and targets", columns=3, height=300, elem_id="gallery"
                )
                maps = gr.Image(label="Attention maps per token", elem_id="attention")
                command = gr.Code(
                    label="Copy as p2p-run command",
                    language="shell",
                    wrap_lines=True,
                    elem_id="command",
                )
                record = gr.File(label="Run record (run.json)", elem_id="record")

        def show_start(choice: str) -> tuple[Any, Any, Any]:
            return (
                gr.update(visible=choice == "photo"),
                gr.update(visible=choice == "inversion"),
                gr.update(visible=choice == "seed"),
            )

        start.change(show_start, start, [photo_group, inversion_group, seed], queue=False)
        method.change(
            lambda chosen: [gr.update(visible=chosen == name) for name in methods],
            method,
            method_groups,
            queue=False,
        )
        photo.change(page.photo_uploaded, photo, [photo_path, photo_name, photo_view, status])
        inversion.change(
            page.inversion_uploaded,
            [inversion, prompt, steps, guidance, height, width],
            [inversion_path, inversion_name, prompt, steps, guidance, height, width, status],
        )
        form_inputs = {
            "start": start,
            "photo": photo_path,
            "photo_name": photo_name,
            "inversion": inversion_path,
            "inversion_name": inversion_name,
            "method": method,
            "prompt": prompt,
            "targets": targets,
            "edit": edit,
            "cross_replace": cross,
            "cross_replace_words": cross_words,
            "self_replace": self_replace,
            "steps": steps,
            "guidance": guidance,
            "seed": seed,
            "height": height,
            "width": width,
            "scheduler": scheduler,
            "attention": attention,
        }
        inputs = [form_inputs[name] for name in Page.form_names()] + edit_inputs + method_inputs

        tracker = gr.Progress()  # Gradio finds the progress tracker by its default value

        async def run_clicked(*values: Any, progress: Any = tracker) -> tuple[Any, ...]:
            return await page.run(*values, progress=progress)

        running = run.click(
            run_clicked,
            inputs,
            [status, gallery, maps, command, record],
            concurrency_limit=1,
            concurrency_id="model",
            api_name="run",
        )
        stop.click(None, None, None, cancels=[running], queue=False)
    app.queue(default_concurrency_limit=1, max_size=32)
    return app


def serve(
    service: EditService,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    block: bool = True,
) -> Any:
    """Start the page on ``host:port`` (the model loaded first). With ``block`` it serves
    until interrupted; else it returns the running app (``app.close()`` stops it)."""
    gr = import_gradio(service)
    app = build_app(service)
    theme = gr.themes.Default(
        # System fonts: the page loads nothing from outside the server.
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "monospace"],
    )
    app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        max_file_size=service.max_upload_bytes,
        show_error=False,
        quiet=True,
        ssr_mode=False,
        footer_links=[],
        theme=theme,
        mcp_server=False,
        run_history=False,
        # The run folders: Gradio serves the images and run.json the handler returns.
        allowed_paths=[str(service.workdir / "runs")],
    )
    return app


__all__ = ["EXTRA_HINT", "START_CHOICES", "Page", "build_app", "import_gradio", "serve"]
