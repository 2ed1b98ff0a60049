"""The Stable Diffusion XL adapter: two text encoders and the UNet's added conditioning.

SDXL's UNet takes, besides the text's hidden states, a pooled text embedding and six "time
ids" (original size, crop corner, target size: its micro-conditioning) per row. The rest of
the framework passes one tensor per row as the UNet's context (``encode_text`` gives it,
``predict`` takes it, null-text inversion optimises the unconditional one, ``.p2pinv`` files
store it), so this adapter packs the pooled embedding into that tensor as one extra row:

``context[:, :tokens]`` is the concatenation of both encoders' penultimate hidden states
(``(rows, 77, 768 + 1280)`` for SDXL base) and ``context[:, tokens, :pooled]`` the second
encoder's projected pooled output (1280 wide; the rest of that row is zero). :meth:`predict`
unpacks it, so attention layers, edits and attention maps see the usual 77 tokens. The time ids
depend only on the image size and the run's settings (:class:`SizeConditioning`), so they are
not part of the context.

Everything else (loop, edits, sources, inversion) is shared with SD 1.x/2.x.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ModelLoadError, OptionError
from .model import StableDiffusionModel

#: :attr:`StableDiffusionModel.family` of SDXL models (recorded in run.json and ``.p2pinv``).
SDXL_FAMILY = "stable-diffusion-xl"


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning, as ``StableDiffusionXLPipeline`` takes it, in pixels.

    Attributes:
        original_size: ``(height, width)`` the model is told the training image had; None:
            the generated image's size (diffusers' default).
        crop_top_left: ``(top, left)`` of the crop the model is told was taken ((0, 0)).
        target_size: ``(height, width)`` the model is told to aim for; None: the image size.
    """

    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None

    @property
    def is_default(self) -> bool:
        return self == SizeConditioning()

    def time_ids(self, height: int, width: int) -> list[int]:
        """The six numbers of diffusers' ``add_time_ids`` for an image of ``height x width``
        pixels: original size, crop corner, target size."""
        original = self.original_size or (height, width)
        target = self.target_size or (height, width)
        return [*original, *self.crop_top_left, *target]


@dataclass
class StableDiffusionXLModel(StableDiffusionModel):
    """Adapter for diffusers ``StableDiffusionXLPipeline`` folders (SDXL base, SDXL-Turbo).

    Attributes:
        text_encoder_2, tokenizer_2: the second (OpenCLIP bigG, with projection) encoder.
        force_zeros_for_empty_prompt: the pipeline's rule that the unconditional embedding
            (hidden states and pooled) is zero rather than the encoding of ``""`` (True for
            SDXL base).
    """

    text_encoder_2: Any = None
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = True
    family: str = SDXL_FAMILY
    _pooled_width: int = field(default=0, repr=False)
    _time_ids: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._pooled_width = int(self.text_encoder_2.config.projection_dim)
        context_width = int(self.unet.config.cross_attention_dim)
        if self._pooled_width > context_width:  # never in a published SDXL
            raise ModelLoadError(
                f"the pooled text embedding ({self._pooled_width} wide) is wider than the "
                f"UNet's context ({context_width}); this adapter cannot pack it"
            )
        expected = int(self.unet.add_embedding.linear_1.in_features)
        given = int(self.unet.config.addition_time_embed_dim) * 6 + self._pooled_width
        if expected != given:
            raise ModelLoadError(
                f"the UNet expects an added embedding of {expected} numbers, but the text "
                f"encoder's projection ({self._pooled_width}) and 6 time ids give {given}"
            )

    @property
    def context_tokens(self) -> int:
        """Rows of the context per prompt: the tokens plus the packed pooled row."""
        return self.max_tokens + 1

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(prompts, 77)`` ids of the first tokenizer, whose positions word lookups,
        mappers and alignments use; checked against the second tokenizer's.

        SDXL's two tokenizers share one vocabulary and differ only in the padding token, so
        every word is at the same position in both; a checkpoint whose tokenizers disagree
        would make the edits' token positions wrong for one encoder, and is refused.

        Raises:
            OptionError: the tokenizers split a prompt differently.
        """
        return self._both_token_ids(prompts)[0]

    def _both_token_ids(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both tokenizers' ``(prompts, 77)`` ids, checked to agree (:meth:`token_ids`)."""
        first = self._tokenize(self.tokenizer, prompts)
        second = self._tokenize(self.tokenizer_2, prompts)
        end = self.tokenizer.eos_token_id
        for prompt, a, b in zip(prompts, first.tolist(), second.tolist()):
            length = a.index(end) + 1 if end in a else len(a)
            if a[:length] != b[:length]:
                raise OptionError(
                    "prompt",
                    "text",
                    f"the model's two tokenizers split {prompt!r} differently, so word "
                    "positions would differ between its text encoders",
                )
        return first, second

    def pack(self, hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The context ``(rows, tokens + 1, dim)`` from hidden states ``(rows, tokens, dim)``
        and pooled embeddings ``(rows, pooled_dim)``."""
        extra = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[2])
        extra[:, 0, : pooled.shape[-1]] = pooled.to(hidden.dtype)
        return torch.cat([hidden, extra], dim=1)

    def unpack(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden (rows, tokens, dim), pooled (rows, pooled_dim))`` from :meth:`pack`'s
        context."""
        return context[:, :-1], context[:, -1, : self._pooled_width]

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """The packed context ``(prompts, 78, dim)`` (module docstring), as
        ``StableDiffusionXLPipeline.encode_prompt`` computes it: both encoders' penultimate
        hidden states side by side, and the second encoder's projected pooled output."""
        ids_1, ids_2 = self._both_token_ids(prompts)
        ids_1, ids_2 = ids_1.to(self.text_encoder.device), ids_2.to(self.text_encoder_2.device)
        out_1 = self.text_encoder(ids_1, output_hidden_states=True)
        out_2 = self.text_encoder_2(ids_2, output_hidden_states=True)
        hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        context = self.pack(hidden, out_2[0])
        return context.to(dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def uncond_context(self) -> torch.Tensor:
        """``(1, 78, dim)``: zeros under ``force_zeros_for_empty_prompt`` (SDXL base), as
        diffusers' pipeline, else the encoding of ``""``."""
        if self.force_zeros_for_empty_prompt:
            return torch.zeros(
                1, self.context_tokens, int(self.unet.config.cross_attention_dim),
                dtype=self.dtype, device=self.device,
            )  # fmt: skip
        return super().uncond_context()

    def check_size_conditioning(self, sizes: SizeConditioning | None) -> None:
        """SDXL takes any size conditioning: nothing to refuse."""

    def predict(
        self,
        latents: torch.Tensor,
        timestep: Any,
        context: torch.Tensor,
        sizes: SizeConditioning | None = None,
    ) -> torch.Tensor:
        """The UNet's raw output for latents ``(batch, 4, h, w)`` and packed contexts
        ``(batch, 78, dim)``; the time ids come from ``sizes`` (default: the image size)."""
        hidden, pooled = self.unpack(context)
        # One copy here: on the strided slice, every cross-attention layer's key and value
        # projections would each run as a batched matmul over an expanded weight (three
        # more dispatched ops than diffusers' one matrix product on a contiguous tensor).
        hidden = hidden.contiguous()
        factor = self.vae_scale_factor
        ids = (sizes or SizeConditioning()).time_ids(
            latents.shape[-2] * factor, latents.shape[-1] * factor
        )
        key = (tuple(ids), context.dtype, context.device)
        time_ids = self._time_ids.get(key)
        if time_ids is None:  # once per size and device: not a host-to-device copy per call
            time_ids = self._time_ids[key] = torch.tensor(
                [ids], dtype=context.dtype, device=context.device
            )
        added = {"text_embeds": pooled, "time_ids": time_ids.expand(latents.shape[0], -1)}
        return self._call_unet(latents, timestep, hidden, added_cond_kwargs=added)

    def _upcast(self) -> bool:
        """diffusers' SDXL rule: a float16 VAE with ``force_upcast`` runs in float32."""
        return self.vae.dtype == torch.float16 and bool(
            getattr(self.vae.config, "force_upcast", False)
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``(batch, 3, H, W)`` in [0, 1], float32; the VAE in float32 for the call
        where the pipeline would upcast it."""
        if self._upcast():
            return self.decode_upcast(latents)
        return super().decode(latents)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Latents from images ``(batch, 3, H, W)`` in [0, 1], with the VAE upcast as in
        :meth:`decode`."""
        if not self._upcast():
            return super().encode_image(images)
        dtype = self.vae.dtype
        with self._vae_in_float32():
            return super().encode_image(images.float()).to(dtype)


def sdxl_from_components(
    components: dict[str, Any], config: Any, text: str, **fields: Any
) -> StableDiffusionXLModel:
    """The SDXL adapter from a loaded pipeline's components.

    Raises:
        ModelLoadError: a refiner (no first text encoder) or a guidance-embedded (LCM-distilled)
            UNet, which this adapter does not drive.
    """
    if components.get("text_encoder") is None or components.get("tokenizer") is None:
        raise ModelLoadError(
            f"{text!r} is an SDXL refiner (no first text encoder); only SDXL base models "
            "(and Turbo) are supported"
        )
    if getattr(components["unet"].config, "time_cond_proj_dim", None) is not None:
        raise ModelLoadError(
            f"{text!r} has a guidance-embedded UNet (LCM-distilled), which is not supported; "
            "use the base model with an LCM LoRA fused in, or SDXL-Turbo"
        )
    missing = [
        name
        for name in ("unet", "vae", "text_encoder_2", "tokenizer_2")
        if components.get(name) is None
    ]
    if missing:
        raise ModelLoadError(f"{text!r} is not an SDXL pipeline (missing {missing})")
    force_zeros = config.get("force_zeros_for_empty_prompt", True)
    return StableDiffusionXLModel(
        unet=components["unet"],
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        text_encoder_2=components["text_encoder_2"],
        tokenizer_2=components["tokenizer_2"],
        force_zeros_for_empty_prompt=bool(force_zeros),
        **fields,
    )
