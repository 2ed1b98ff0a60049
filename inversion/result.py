"""The :class:`Inversion` result and its ``.p2pinv`` file.

A ``.p2pinv`` file is one safetensors file: the tensors (``latent``, ``image_latent`` and,
depending on the method, ``uncond_embeddings`` or ``source_latents``) plus, in the
safetensors header metadata, ``format`` = ``p2p-framework-inversion``, ``format_version`` and
``inversion``: a JSON object with everything else (method and options, prompt, model
identity, scheduler, steps, guidance, size, per-step statistics).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from p2p_framework.model import StableDiffusionModel
from p2p_framework.outputs import write_bytes_atomic

from .ddim import scheduler_signature
from .errors import InversionFileError, InversionMismatchError

FORMAT = "p2p-framework-inversion"
FORMAT_VERSION = 1
SUFFIX = ".p2pinv"
_TENSORS = ("latent", "image_latent", "uncond_embeddings", "source_latents")


def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two ``model.identity`` dicts name the same weights.

    Local folders compare by ``folder_hash`` (so a moved folder still matches), hub models
    by id and commit; anything else by equality.
    """
    if a.get("folder_hash") and b.get("folder_hash"):
        return a["folder_hash"] == b["folder_hash"]
    if a.get("commit") and b.get("commit"):
        return a.get("model") == b.get("model") and a["commit"] == b["commit"]
    return a == b


def _describe_model(identity: dict[str, Any]) -> str:
    name = identity.get("model", "?")
    detail = identity.get("folder_hash") or identity.get("commit") or identity.get("revision")
    return f"{name} ({str(detail)[:12]})" if detail else str(name)


@dataclass
class Inversion:
    """A real photo inverted for one model, prompt, scheduler, step count and size.

    Tensors are float32 on the CPU.

    Attributes:
        method: the name of the source that made it (``null-text``, ``negative-prompt``,
            ``direct``, ``ddim`` or a plugin's invertible source).
        prompt: the source prompt it was inverted with.
        latent: ``(1, C, h, w)`` starting latent ``z_T``.
        image_latent: ``(1, C, h, w)`` the encoded photo ``z_0``.
        num_steps, guidance, height, width: the settings it was made for.
        model_identity: ``model.identity`` of the model it was made with.
        scheduler_config: class and trajectory-deciding config of its DDIM scheduler.
        options: the method's options.
        uncond_embeddings: ``(T, tokens, dim)`` unconditional embedding of each step, or
            None (``""`` at every step).
        source_latents: ``(T, C, h, w)`` latent of the source row after each step, or None.
        steps: per step statistics of the method, e.g. null-text's
            ``{"inner_steps": int, "loss": float | None}``.
        stats: totals: ``seconds``, ``unet_calls``, ``unet_forward_rows``,
            ``unet_backward_rows``.
        image_hash: SHA-256 of the prepared image's pixels.
        crop: the crop offsets ``(left, right, top, bottom)`` applied before resizing.
        model_family: ``model.family`` of the model it was made with
            (``stable-diffusion``, ``stable-diffusion-xl``): a model of another family reads
            its latents and embeddings differently and refuses it. Files written before the
            field were all ``stable-diffusion``.
    """

    method: str
    prompt: str
    latent: torch.Tensor
    image_latent: torch.Tensor
    num_steps: int
    guidance: float
    height: int
    width: int
    model_identity: dict[str, Any]
    scheduler_config: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    uncond_embeddings: torch.Tensor | None = None
    source_latents: torch.Tensor | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    image_hash: str | None = None
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)
    model_family: str = "stable-diffusion"

    # -- use --------------------------------------------------------------------------------
    def uncond_embedding_list(self) -> list[torch.Tensor] | None:
        """Per step ``(1, tokens, dim)`` unconditional embeddings, or None."""
        if self.uncond_embeddings is None:
            return None
        return [self.uncond_embeddings[i : i + 1] for i in range(self.num_steps)]

    def source_latent_list(self) -> list[torch.Tensor] | None:
        """Per step ``(1, C, h, w)`` source-row latents, or None."""
        if self.source_latents is None:
            return None
        return [self.source_latents[i : i + 1] for i in range(self.num_steps)]

    def summary(self) -> dict[str, Any]:
        """JSON-ready facts for a run record (no tensors)."""
        facts: dict[str, Any] = {
            "method": self.method,
            "options": dict(self.options),
            "num_steps": self.num_steps,
            "guidance": self.guidance,
            "size": [self.height, self.width],
            **self.stats,
        }
        # Per-step statistics, one list per key (null-text's "loss" is "final_loss").
        keys = dict.fromkeys(key for step in self.steps for key in step)
        for key in keys:
            name = "final_loss" if key == "loss" else key
            facts[name] = [step.get(key) for step in self.steps]
        return facts

    def check(
        self,
        model: StableDiffusionModel | None = None,
        *,
        scheduler: Any = None,
        num_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        prompt: str | None = None,
        guidance: float | None = None,
        name: str = "the inversion",
    ) -> None:
        """Refuse to use this inversion for a run it was not made for.

        Only the given arguments are checked. Give ``guidance`` only for a method whose
        inversion depends on it (``InvertingSource.guidance_specific``: null-text, whose
        embeddings are optimised for one guidance scale, or fixed-point).

        Raises:
            InversionMismatchError: listing every mismatch.
        """
        family = getattr(model, "family", "stable-diffusion")
        if model is not None and family != self.model_family:
            # Alone: the other checks compare things that mean different things across families.
            raise InversionMismatchError(
                f"{name} was made with a {self.model_family} model "
                f"({_describe_model(self.model_identity)}); this model is {family}, whose "
                "latents and text embeddings differ: invert the photo again with this model"
            )
        problems = []
        if model is not None and not same_model(self.model_identity, model.identity):
            problems.append(
                f"it was made with model {_describe_model(self.model_identity)}, "
                f"not {_describe_model(model.identity)}"
            )
        if scheduler is not None:
            theirs = scheduler_signature(scheduler)
            diff = sorted(
                k
                for k in set(theirs) | set(self.scheduler_config)
                if theirs.get(k) != self.scheduler_config.get(k)
            )
            if diff:
                shown = ", ".join(
                    f"{k}={self.scheduler_config.get(k)!r} (run: {theirs.get(k)!r})" for k in diff
                )
                problems.append(f"its scheduler differs: {shown}")
        if num_steps is not None and num_steps != self.num_steps:
            problems.append(f"it has {self.num_steps} steps, the run {num_steps}")
        if (height is not None and height != self.height) or (
            width is not None and width != self.width
        ):
            problems.append(
                f"it is {self.width}x{self.height} px (width x height), the run "
                f"{width or self.width}x{height or self.height}"
            )
        if prompt is not None and prompt != self.prompt:
            problems.append(f"it was inverted with prompt {self.prompt!r}, not {prompt!r}")
        if guidance is not None and float(guidance) != float(self.guidance):
            problems.append(
                f"its {self.method} inversion was made for guidance {self.guidance}, "
                f"the run uses {guidance}"
            )
        if problems:
            raise InversionMismatchError(f"{name} does not fit this run: " + "; ".join(problems))

    # -- files ------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """Everything but the tensors, JSON-ready."""
        return {
            "method": self.method,
            "prompt": self.prompt,
            "num_steps": self.num_steps,
            "guidance": self.guidance,
            "height": self.height,
            "width": self.width,
            "model_identity": self.model_identity,
            "scheduler_config": self.scheduler_config,
            "options": self.options,
            "steps": self.steps,
            "stats": self.stats,
            "image_hash": self.image_hash,
            "crop": list(self.crop),
            "model_family": self.model_family,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a ``.p2pinv`` file atomically (temporary file, then ``os.replace``).

        Returns:
            the path written.
        """
        from safetensors.torch import save

        path = Path(path).expanduser()
        tensors = {
            key: getattr(self, key).detach().to("cpu", torch.float32).contiguous()
            for key in _TENSORS
            if getattr(self, key) is not None
        }
        header = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "inversion": json.dumps(self.metadata(), sort_keys=True),
        }
        data = save(tensors, metadata=header)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_bytes_atomic(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Inversion:
        """Read a ``.p2pinv`` file.

        Raises:
            InversionFileError: missing, unreadable, or not an inversion file of a known
                format version.
        """
        from safetensors import safe_open

        path = Path(path).expanduser()
        if not path.is_file():
            raise InversionFileError(f"inversion file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as file:
                header = file.metadata() or {}
                tensors = {key: file.get_tensor(key) for key in file.keys()}
        except Exception as error:  # safetensors raises its own error types
            raise InversionFileError(f"cannot read inversion file {str(path)!r}: {error}") from None
        if header.get("format") != FORMAT:
            raise InversionFileError(f"{str(path)!r} is not a p2p-framework inversion file")
        if header.get("format_version") != str(FORMAT_VERSION):
            raise InversionFileError(
                f"{str(path)!r} has inversion format version {header.get('format_version')!r}; "
                f"this version reads {FORMAT_VERSION}"
            )
        try:
            meta = json.loads(header["inversion"])
            inversion = cls(
                method=meta["method"],
                prompt=meta["prompt"],
                latent=tensors["latent"],
                image_latent=tensors["image_latent"],
                num_steps=int(meta["num_steps"]),
                guidance=float(meta["guidance"]),
                height=int(meta["height"]),
                width=int(meta["width"]),
                model_identity=dict(meta["model_identity"]),
                scheduler_config=dict(meta["scheduler_config"]),
                options=dict(meta.get("options", {})),
                uncond_embeddings=tensors.get("uncond_embeddings"),
                source_latents=tensors.get("source_latents"),
                steps=list(meta.get("steps", [])),
                stats=dict(meta.get("stats", {})),
                image_hash=meta.get("image_hash"),
                crop=tuple(meta.get("crop", (0, 0, 0, 0))),  # type: ignore[arg-type]
                model_family=str(meta.get("model_family", "stable-diffusion")),
            )
            inversion.validate()
        except (KeyError, TypeError, ValueError) as error:
            raise InversionFileError(
                f"inversion file {str(path)!r} is incomplete or damaged: {error}"
            ) from None
        return inversion

    def validate(self) -> None:
        """Check that the tensors fit the method and step count.

        Raises:
            ValueError: what does not fit.
        """
        needs = {"null-text": "uncond_embeddings", "negative-prompt": "uncond_embeddings"}
        needs["direct"] = "source_latents"
        if self.latent.dim() != 4 or self.latent.shape[0] != 1:
            raise ValueError(f"latent has shape {tuple(self.latent.shape)}")
        wanted = needs.get(self.method)
        for key in ("uncond_embeddings", "source_latents"):
            tensor = getattr(self, key)
            if key == wanted and tensor is None:
                raise ValueError(f"a {self.method} inversion needs {key}")
            if tensor is not None and tensor.shape[0] != self.num_steps:
                raise ValueError(f"{key} has {tensor.shape[0]} steps, not {self.num_steps}")
