"""p2p-framework: Prompt-to-Prompt editing and null-text inversion on diffusers, with plugins.

The public API::

    from p2p_framework import load_model, run_edit, EditSettings, get_registry

    model = load_model("CompVis/stable-diffusion-v1-4")
    registry = get_registry()
    edits = [registry.build("edit", "replace")]
    result = run_edit(model, ["a cat on a mat", "a dog on a mat"], edits)
    result.images[1].save("dog.png")

Plugin authors subclass :class:`Edit` or :class:`Source` and register them with
:data:`hookimpl` functions (see ``docs/plugins.md``).
"""

from .attention import AttentionController, ControlledAttnProcessor
from .edit import (
    Edit,
    EditRun,
    LinearCrossAttention,
    PromptToPromptEdit,
    RunContext,
    SelfReplaceRun,
    Step,
)
from .errors import (
    ModelLoadError,
    NumericalError,
    OptionError,
    P2PError,
    P2PWarning,
    PluginError,
    PluginRunError,
    PromptError,
)
from .filters import EditPair, Filter
from .hookspecs import hookimpl
from .model import StableDiffusionModel, load_model
from .model_sdxl import SizeConditioning, StableDiffusionXLModel
from .options import OptionInfo, Plugin
from .outputs import attention_image, grid_image
from .pipeline import EditJob, EditResult, EditSettings, run_edit, run_edits
from .registry import PluginInfo, PluginRegistry, get_registry
from .schedules import CrossReplace, StepWindow
from .source import (
    Source,
    SourceLatentGuide,
    SourceRequest,
    SourceStart,
    StepGuide,
    UncondEmbeddingGuide,
)
from .store import AttentionLayer, AttentionStore

__version__ = "0.1.0"

__all__ = [
    "AttentionController",
    "AttentionLayer",
    "AttentionStore",
    "ControlledAttnProcessor",
    "CrossReplace",
    "Edit",
    "EditJob",
    "EditRun",
    "EditResult",
    "EditSettings",
    "EditPair",
    "Filter",
    "LinearCrossAttention",
    "ModelLoadError",
    "NumericalError",
    "OptionError",
    "OptionInfo",
    "P2PError",
    "P2PWarning",
    "Plugin",
    "PluginError",
    "PluginRunError",
    "PluginInfo",
    "PluginRegistry",
    "PromptError",
    "PromptToPromptEdit",
    "RunContext",
    "SelfReplaceRun",
    "Source",
    "SourceRequest",
    "SourceLatentGuide",
    "SourceStart",
    "SizeConditioning",
    "StableDiffusionModel",
    "StableDiffusionXLModel",
    "Step",
    "StepWindow",
    "StepGuide",
    "UncondEmbeddingGuide",
    "attention_image",
    "get_registry",
    "grid_image",
    "hookimpl",
    "load_model",
    "run_edit",
    "run_edits",
]
