"""Random-weight Stable Diffusion architectures (p2p_framework.testing.random_models) and the
at-scale benchmark built on them (benchmarks/scale.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from p2p_framework.testing import (
    ARCHITECTURES,
    CLIP_VOCAB_SIZE,
    architecture,
    build_random_model,
    diffusers_pipeline,
    narrow,
    parameter_counts,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("name", "unet", "text_encoder"),
    [
        # The published sizes: SD 1.5 UNet 859.52 M, CLIP ViT-L/14 text 123.06 M; SD 2.1 UNet
        # 865.91 M, OpenCLIP ViT-H/14 text (23 of its 24 layers) 340.39 M; VAE 83.65 M.
        ("sd15", 859_520_964, 123_060_480),
        ("sd21", 865_910_724, 340_387_840),
    ],
)
def test_full_architectures_have_the_published_parameter_counts(name, unet, text_encoder):
    counts = parameter_counts(name)  # meta device: no memory
    assert counts == {"unet": unet, "vae": 83_653_863, "text_encoder": text_encoder}
    assert counts == dict(architecture(name).parameters)


def test_sdxl_has_the_published_parameter_counts_and_layout():
    # SDXL base 1.0: UNet 2,567.46 M; CLIP ViT-L/14 123.06 M + OpenCLIP bigG/14 694.66 M.
    sdxl = architecture("sdxl")
    counts = parameter_counts("sdxl")
    assert counts == {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    }
    assert counts == dict(sdxl.parameters)
    assert sdxl.default_size == 1024 and sdxl.vae["scaling_factor"] == 0.13025
    assert sdxl.unet["transformer_layers_per_block"] == (1, 2, 10)
    small = architecture("sdxl-small")
    assert small.unet["transformer_layers_per_block"] == (1, 2, 10)
    assert small.unet["cross_attention_dim"] == 2 * small.text_encoder["hidden_size"]


def test_sdxl_small_builds_runs_and_matches_diffusers():
    from p2p_framework.model_sdxl import StableDiffusionXLModel

    model = build_random_model("sdxl-small", device="cpu", dtype="float32")
    assert isinstance(model, StableDiffusionXLModel)
    processors = model.unet.attn_processors
    assert sum(".attn2." in name for name in processors) == 70  # SDXL's 70 cross layers
    pipe = diffusers_pipeline(model)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and pipe.unet is model.unet
    prompt = "a painting of a squirrel eating a burger"
    hidden, _, pooled, _ = pipe.encode_prompt(
        prompt, device="cpu", do_classifier_free_guidance=False
    )
    ours = model.unpack(model.encode_text([prompt]))
    assert torch.equal(ours[0], hidden) and torch.equal(ours[1], pooled)


def test_full_configs_are_the_published_ones():
    sd15, sd21 = architecture("sd15"), architecture("sd21")
    assert (
        sd15.unet["block_out_channels"]
        == sd21.unet["block_out_channels"]
        == (
            320,
            640,
            1280,
            1280,
        )
    )
    assert (sd15.unet["attention_head_dim"], sd15.unet["cross_attention_dim"]) == (8, 768)
    assert (sd21.unet["attention_head_dim"], sd21.unet["cross_attention_dim"]) == (
        (5, 10, 20, 20),
        1024,
    )
    assert not sd15.unet["use_linear_projection"] and sd21.unet["use_linear_projection"]
    assert (sd15.default_size, sd21.default_size) == (512, 768)
    assert (sd15.prediction_type, sd21.prediction_type) == ("epsilon", "v_prediction")
    assert sd15.vae["scaling_factor"] == sd21.vae["scaling_factor"] == 0.18215
    text15, text21 = sd15.text_encoder, sd21.text_encoder
    assert (text15["num_hidden_layers"], text15["hidden_size"], text15["hidden_act"]) == (
        12,
        768,
        "quick_gelu",
    )
    assert (text21["num_hidden_layers"], text21["hidden_size"], text21["hidden_act"]) == (
        23,
        1024,
        "gelu",
    )
    assert (text21["num_attention_heads"], text21["intermediate_size"]) == (16, 4096)


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_small_variants_keep_the_block_layout(name):
    full, small = architecture(name), architecture(f"{name}-small")
    for key in (
        "down_block_types",
        "up_block_types",
        "mid_block_type",
        "layers_per_block",
        "attention_head_dim",
        "use_linear_projection",
        "upcast_attention",
        "sample_size",
    ):
        assert small.unet[key] == full.unet[key], key
    assert small.prediction_type == full.prediction_type
    assert small.text_encoder["hidden_act"] == full.text_encoder["hidden_act"]
    assert small.small and not full.small
    assert parameter_counts(small)["unet"] < 20_000_000


@pytest.mark.parametrize("name", ["sd15-small", "sd21-small"])
def test_small_variants_build_and_run_one_unet_call(name):
    model = build_random_model(name, device="cpu", dtype="float32")
    assert model.prediction_type == architecture(name).prediction_type
    ids = model.token_ids(["a painting of a squirrel eating a burger"])
    assert int(ids.max()) < CLIP_VOCAB_SIZE == model.text_encoder.config.vocab_size
    context = model.encode_text(["a photo of a cat", "a photo of a dog"])
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out = model.predict(latents, torch.tensor(500), context)
    assert out.shape == latents.shape and torch.isfinite(out).all()
    assert not model.unet.training and not any(p.requires_grad for p in model.unet.parameters())


def test_build_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a = build_random_model("sd15-small", device="cpu", seed=3)
    b = build_random_model("sd15-small", device="cpu", seed=3)
    c = build_random_model("sd15-small", device="cpu", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    weight = "conv_in.weight"
    assert torch.equal(a.unet.state_dict()[weight], b.unet.state_dict()[weight])
    assert not torch.equal(a.unet.state_dict()[weight], c.unet.state_dict()[weight])


def test_diffusers_pipeline_shares_the_modules():
    model = build_random_model("sd21-small", device="cpu")
    pipe = diffusers_pipeline(model)
    assert pipe.unet is model.unet and pipe.vae is model.vae
    assert pipe.text_encoder is model.text_encoder and pipe.tokenizer is model.tokenizer
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert not pipe.scheduler.config.clip_sample


def test_narrow_checks_widths_against_heads():
    assert narrow(ARCHITECTURES["sd15"], 96).unet["block_out_channels"] == (96, 192, 384, 384)
    with pytest.raises(ValueError, match="heads"):
        narrow(ARCHITECTURES["sd21"], 32)  # 32 channels do not split into 5 heads
    with pytest.raises(ValueError, match="unknown architecture"):
        architecture("sd3")


def _benchmark_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_write_section_replaces_only_its_subsection(tmp_path):
    write_section = _benchmark_module("inversion.py").write_section
    path = tmp_path / "bench.md"
    path.write_text("# Benchmarks\n\n## Speed at scale\n\nIntro.\n\n## Inversion\n\nKeep.\n")
    write_section(path, "first", title="GPU, 512 px", parent="Speed at scale")
    write_section(path, "cpu", title="CPU, small", parent="Speed at scale")
    write_section(path, "second", title="GPU, 512 px", parent="Speed at scale")
    text = path.read_text()
    assert text.count("### GPU, 512 px") == 1 and "second" in text and "first" not in text
    assert text.index("Intro.") < text.index("### GPU") < text.index("### CPU")
    assert text.index("### CPU") < text.index("## Inversion") and "Keep." in text
    write_section(path, "new", title="Other", parent="Missing parent")
    assert path.read_text().rstrip().endswith("## Missing parent\n\n### Other\n\nnew")
    write_section(path, "replaced", title="Inversion")
    assert "Keep." not in path.read_text() and "replaced" in path.read_text()


@pytest.mark.slow  # the whole benchmark in a subprocess (about 45 s)
def test_scale_benchmark_small_runs_end_to_end(tmp_path):
    scale = _benchmark_module("scale.py")
    out, docs = tmp_path / "scale.json", tmp_path / "bench.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--small"]
    command += ["--json", str(out), "--write-docs", str(docs), "--machine", "test machine"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for spec in scale.ROWS:
        assert f"| {spec.label} | " in done.stdout, spec.label
    (result,) = json.loads(out.read_text())["results"]
    rows = {row["key"]: row for row in result["rows"]}
    assert set(rows) == {spec.key for spec in scale.ROWS}
    assert not [row for row in rows.values() if "error" in row]
    steps = result["steps"]
    for key in ("plain", "edit", "edit-all"):
        assert (rows[key]["calls"], rows[key]["rows"]) == (steps, 4 * steps), key
        assert rows[key]["seconds"] > 0
    assert rows["edit-all"]["store_bytes"] > rows["edit"]["store_bytes"] > 0
    assert rows["null-text"]["backward_rows"] > 0 and rows["ddim"]["calls"] == steps
    if sys.platform == "linux":
        assert all(row["peak_mb"] > 0 for row in rows.values())
    text = docs.read_text()
    assert "## Speed at scale" in text
    assert "### test machine, SD 1.5 layout, small (width 32), 64 px" in text
