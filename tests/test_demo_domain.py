"""The demo domain: procedural shape scenes, captions, ground truth, scorer, training script."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from p2p_framework.demo.shapes import (
    COLORS,
    MARGIN,
    SHAPES,
    VOCABULARY,
    CaptionSpec,
    Scene,
    SceneBatch,
    SceneObject,
    canonical_bbox,
    caption,
    parse_caption,
    render,
    render_batch,
    sample_scene,
    sample_scene_batch,
    tone_rgb,
)
from tools.demo_model import scoring


def _scenes(seed: int, n: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def test_render_is_deterministic_per_seed():
    a = _scenes(3, 5)
    b = _scenes(3, 5)
    assert a == b
    for sa, sb in zip(a, b):
        ia, ga = render(sa)
        ib, gb = render(sb)
        assert np.array_equal(np.asarray(ia), np.asarray(ib))
        assert all(np.array_equal(x, y) for x, y in zip(ga.masks, gb.masks))
    assert _scenes(4, 5) != a


def test_scene_sampling_respects_the_domain_rules():
    batch = sample_scene_batch(np.random.default_rng(0), 500)
    assert set(np.unique(batch.n_objects)) == {1, 2}
    for scene in batch.scenes():
        colors = [o.color for o in scene.objects] + [scene.background]
        assert len(set(colors)) == len(colors)
        for o in scene.objects:
            assert 0.5 - 1e-9 <= o.cx - o.size and o.cx + o.size <= 63.5 + 1e-9
            assert 0.5 - 1e-9 <= o.cy - o.size and o.cy + o.size <= 63.5 + 1e-9
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert a.cx <= b.cx
            gap = a.size + b.size + MARGIN
            assert abs(a.cx - b.cx) >= gap or abs(a.cy - b.cy) >= gap


def test_captions_mention_exactly_the_rendered_objects():
    for scene in _scenes(1, 60):
        text = caption(scene)
        words = text.split()
        assert set(words) <= set(VOCABULARY)
        assert sum(w in SHAPES for w in words) == len(scene.objects)
        assert sum(w in COLORS for w in words) == len(scene.objects) + 1
        spec = parse_caption(text)
        assert spec == CaptionSpec(
            objects=tuple((o.color, o.shape) for o in scene.objects),
            background=scene.background,
            texture=scene.texture,
        )
        _, truth = render(scene)
        assert truth.shapes == tuple(s for _, s in spec.objects)
        assert truth.colors == tuple(c for c, _ in spec.objects)
    scene = Scene(
        objects=(
            SceneObject("circle", "red", 16, 32, 10),
            SceneObject("square", "blue", 48, 32, 10),
        ),
        background="yellow",
        texture="striped",
    )
    assert caption(scene) == "a red circle and a blue square on a striped yellow background"
    one = Scene(objects=scene.objects[:1], background="yellow")
    assert caption(one) == "a red circle on a yellow background"


@pytest.mark.parametrize(
    "text",
    [
        "a red circle",
        "a red circle on a yellow",
        "a red blob on a yellow background",
        "a red circle and a blue square and a green star on a pink background",
        "a red circle on a plaid yellow background",
    ],
)
def test_parse_caption_rejects_other_text(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_masks_are_exactly_the_painted_pixels():
    for scene in _scenes(2, 40):
        image, truth = render(scene)
        pixels = np.asarray(image)
        assert pixels.shape == (64, 64, 3)
        union = np.zeros((64, 64), bool)
        for mask, color in zip(truth.masks, truth.colors):
            assert mask.sum() > 50
            assert not (mask & union).any()
            union |= mask
            painted = (pixels == COLORS[color]).all(-1)
            assert np.array_equal(painted, mask)
        assert np.array_equal(truth.background_mask, ~union)
        bg = (pixels == COLORS[truth.background]).all(-1)
        tone = (pixels == tone_rgb(truth.background)).all(-1)
        assert np.array_equal(tone, truth.texture_mask)
        assert np.array_equal(bg | tone, truth.background_mask)
        assert truth.texture_mask.any() == (truth.texture != "plain")


def test_batch_rendering_matches_single_rendering():
    batch = sample_scene_batch(np.random.default_rng(5), 12)
    images, masks, _ = render_batch(batch)
    for i, scene in enumerate(batch.scenes()):
        image, truth = render(scene)
        assert np.array_equal(images[i].permute(1, 2, 0).numpy(), np.asarray(image))
        for k, mask in enumerate(truth.masks):
            assert np.array_equal(masks[i, k].numpy(), mask)
    again = SceneBatch.from_scenes(batch.scenes())
    assert again.captions() == batch.captions()
    assert torch.equal(render_batch(again)[0], images)


def test_render_scales_with_size():
    scene = _scenes(6, 1)[0]
    small, truth_small = render(scene, size=64)
    large, truth_large = render(scene, size=128)
    assert large.size == (128, 128)
    for a, b in zip(truth_small.masks, truth_large.masks):
        assert abs(b.sum() / 4 - a.sum()) < 0.1 * a.sum()


def test_canonical_boxes_fit_the_unit_box():
    for shape in SHAPES:
        u0, u1, v0, v1 = canonical_bbox(shape)
        assert -1.001 <= u0 < u1 <= 1.001 and -1.001 <= v0 < v1 <= 1.001
        assert u1 - u0 > 1.5 and v1 - v0 > 1.5


def test_scorer_is_exact_on_ground_truth_renders():
    for scene in _scenes(7, 30):
        image, truth = render(scene)
        for mask, shape in zip(truth.masks, truth.shapes):
            assert scoring.classify_shape(mask) == shape
        result = scoring.score_image(image, scene)
        assert result.exact, (caption(scene), result)
        assert scoring.score_image(image, caption(scene)).exact
        first = scene.objects[0]
        assert scoring.has_object(image, first.color, first.shape)
        found = scoring.find_object(np.asarray(image), first.color)
        assert found is not None and np.array_equal(found.mask, truth.masks[0])


def test_scorer_detects_wrong_attributes():
    scene = Scene(
        objects=(
            SceneObject("star", "red", 18, 20, 12),
            SceneObject("heart", "green", 44, 44, 12),
        ),
        background="blue",
        texture="dotted",
    )
    image, _ = render(scene)
    assert scoring.score_image(image, scene).exact
    assert not scoring.score_image(
        image, "a red circle and a green heart on a blue background"
    ).exact
    wrong_bg = scoring.score_image(image, "a red star on a yellow background")
    assert not wrong_bg.background_ok and wrong_bg.extra_objects == 1
    missing = scoring.score_image(image, "a pink star on a blue background")
    assert missing.color_found == [False]
    assert scoring.find_object(image, "blue") is None  # the background is no object
    # Tensors in [0, 1], channels first, are accepted too.
    tensor = torch.as_tensor(np.array(image)).permute(2, 0, 1).float() / 255
    background, objects = scoring.detect_objects(tensor)
    assert background == "blue"
    assert sorted((o.color, o.shape) for o in objects) == [("green", "heart"), ("red", "star")]


def test_texture_classification_is_exact_on_renders():
    for scene in _scenes(11, 120):
        image, _ = render(scene)
        assert scoring.classify_texture(image) == scene.texture
        assert scoring.classify_texture(image, scene.background) == scene.texture
    plain, _ = render(Scene((SceneObject("star", "red", 30, 30, 12),), "blue"))
    assert scoring.texture_scores(plain) == (0.0, 0.0)
    # A colour that is not in the image: nothing to classify.
    assert scoring.classify_texture(plain, "pink") == "plain"


def test_edit_measures_on_renders():
    from dataclasses import replace

    from tools.demo_model import edit_quality as eq

    case = eq.sample_cases(1)[0]
    scene = case.scene
    obj = scene.objects[0]
    source, truth = render(scene)
    colours = [obj.color]

    def measured(kind: str, edited_scene: Scene) -> eq.Measure:
        edited, _ = render(edited_scene)
        return eq.measure(
            case.specs[kind],
            "p2p",
            0,
            source,
            edited,
            source_background=scene.background,
            source_colors=colours,
        )

    # A perfect colour swap: same mask, nothing else changed.
    new_colour = case.specs["colour"].target_color
    swapped = measured("colour", replace(scene, objects=(replace(obj, color=new_colour),)))
    assert swapped.valid and swapped.success
    assert swapped.iou == 1.0 and swapped.shift == 0.0 and swapped.psnr == float("inf")
    # The same swap with the object moved 6 px: success, but the structure is not kept.
    moved = replace(obj, color=new_colour, cx=obj.cx + 6 if obj.cx < 32 else obj.cx - 6)
    shifted = measured("colour", replace(scene, objects=(moved,)))
    assert shifted.success and shifted.iou < 0.8 and abs(shifted.shift - 6) < 0.5
    assert shifted.psnr == float("inf")  # outside both masks nothing changed
    # The source colour kept: no success, IoU 0.
    assert not measured("colour", scene).success
    # Background swap: judged on the background, the object region kept exactly.
    spec = case.specs["background"]
    background = measured("background", replace(scene, background=spec.background))
    assert background.success and background.iou == 1.0 and background.psnr == float("inf")
    # Reweight down: the object gone is a success, unchanged is not.
    empty = Scene((SceneObject(obj.shape, new_colour, 2, 2, 0.1),), scene.background, scene.texture)
    assert measured("reweight-down", empty).success
    assert not measured("reweight-down", scene).success
    assert eq.mask_iou(truth.masks[0], None) == 0.0


def test_dilate_and_erode():
    from tools.demo_model import edit_quality as eq

    dot = np.zeros((7, 7), bool)
    dot[3, 3] = True
    block = np.zeros((7, 7), bool)
    block[2:5, 2:5] = True
    assert np.array_equal(eq.dilate(dot), block)
    assert np.array_equal(eq.erode(block), dot)
    assert eq.dilate(dot, 3).all()
    inner = np.zeros((4, 4), bool)
    inner[1:3, 1:3] = True
    assert np.array_equal(eq.erode(np.ones((4, 4), bool)), inner)  # the border is outside


def test_connected_components_separate_objects_of_one_colour():
    mask = np.zeros((10, 12), bool)
    mask[1:4, 1:4] = True
    mask[6:9, 2:11] = True
    mask[5, 0] = True
    mask[9, 11] = True  # diagonal neighbour of the second block: same component
    comps = scoring.connected_components(mask)
    assert [int(c.sum()) for c in comps] == [28, 9, 1]
    assert np.array_equal(np.logical_or.reduce(comps), mask)


def test_caption_token_ids_match_the_tokenizer(tmp_path):
    from p2p_framework.testing import build_clip_tokenizer
    from tools.demo_model.train import SceneStream

    tokenizer = build_clip_tokenizer(VOCABULARY, tmp_path / "tok")
    stream = SceneStream(0, tokenizer, torch.device("cpu"))
    batch = stream.batch(8, uncond_prob=0.0)
    images, ids = batch.images, batch.ids
    assert images.shape == (8, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    assert ids.shape == (8, tokenizer.model_max_length)
    # Regions: the objects' masks and the rest; every pixel is in exactly one of them.
    assert batch.regions.shape == (8, 3, 64, 64)
    assert torch.equal(batch.regions.sum(dim=1), torch.ones(8, 64, 64))
    dropped = stream.batch(8, uncond_prob=1.0)
    assert (dropped.token_region == -1).all()
    assert (dropped.ids == torch.as_tensor(stream.uncond)).all()
    batch = sample_scene_batch(np.random.default_rng(9), 8)
    expected = tokenizer(batch.captions(), padding="max_length", max_length=77).input_ids
    assert np.array_equal(stream.token_ids(batch), np.array(expected))


def test_word_regions_name_each_objects_words_and_the_background_words():
    from p2p_framework.demo.shapes import COLOR_NAMES, TEXTURES
    from tools.demo_model.train import REGION_BACKGROUND, word_regions

    batch = sample_scene_batch(np.random.default_rng(3), 300)
    regions = word_regions(batch, 77)
    assert regions.shape == (300, 77)
    for i in range(len(batch)):
        words = batch.caption_words(i)
        named = {}
        for token in np.nonzero(regions[i] >= 0)[0]:
            named[words[token - 1]] = int(regions[i, token])  # token 0 is the start token
        expected = {}
        for k in range(int(batch.n_objects[i])):
            expected[COLOR_NAMES[batch.color[i, k]]] = k
            expected[SHAPES[batch.shape[i, k]]] = k
        expected[COLOR_NAMES[batch.background[i]]] = REGION_BACKGROUND
        if TEXTURES[batch.texture[i]] != "plain":
            expected[TEXTURES[batch.texture[i]]] = REGION_BACKGROUND
        # A word used twice (two red objects) names one of them per occurrence; compare counts.
        assert (regions[i] >= 0).sum() == 2 * batch.n_objects[i] + 1 + (
            TEXTURES[batch.texture[i]] != "plain"
        )
        if len(set(words)) == len(words):
            assert named == expected, words


def test_grounding_loss_is_zero_for_maps_inside_their_regions_and_grows_when_flat():
    from tools.demo_model.train import grounding_loss

    regions = torch.zeros(1, 3, 64, 64)
    regions[0, 0, :32, :32] = 1  # object 0: the top-left quarter
    regions[0, 2] = 1 - regions[0, 0]  # background
    token_region = torch.tensor([[-1, 0, 2, -1]])
    grid = 8
    area = torch.nn.functional.adaptive_avg_pool2d(regions, grid).flatten(2)[0]  # (3, 64)
    inside = torch.zeros(1, 2, grid * grid, 4)
    inside[0, :, :, 1] = area[0] * 0.5
    inside[0, :, :, 2] = area[2] * 0.5
    inside[..., 0] = 1 - inside[..., 1] - inside[..., 2]
    assert float(grounding_loss([inside], regions, token_region)) == pytest.approx(0, abs=1e-7)
    flat = torch.full((1, 2, grid * grid, 4), 0.25)
    expected = ((1 - 0.25) ** 2 + (1 - 0.75) ** 2) / 2  # mass share = the region's area
    assert float(grounding_loss([flat], regions, token_region)) == pytest.approx(expected)
    # Grids coarser than min_grid are left out; so are captions without named words.
    coarse = torch.full((1, 2, 4, 4), 0.25)
    assert float(grounding_loss([coarse], regions, token_region)) == 0
    assert float(grounding_loss([flat], regions, torch.full((1, 4), -1))) == 0


def test_cross_attention_probe_computes_what_the_default_processor_does():
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from tools.demo_model.train import UNET_CONFIG, CrossAttentionProbe

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 128)
    t = torch.tensor([500, 20])
    with torch.no_grad():
        expected = unet(x, t, context).sample
        probe = CrossAttentionProbe()
        unet.set_attn_processor(
            {
                name: probe if name.endswith("attn2.processor") else AttnProcessor2_0()
                for name in unet.attn_processors
            }
        )
        got = unet(x, t, context).sample
    assert torch.allclose(got, expected, atol=1e-5)
    # One map per cross-attention layer: (batch, heads, queries, tokens), rows summing to 1.
    assert len(probe.maps) == 16
    assert sorted({m.shape[2] for m in probe.maps}) == [4, 16, 64, 256]
    assert all(m.shape[:2] == (2, 4) and m.shape[3] == 77 for m in probe.maps)
    assert torch.allclose(probe.maps[0].sum(-1), torch.ones(2, 4, 256))


@pytest.mark.slow
def test_smoke_training_writes_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from tools.demo_model.train import main

    out = tmp_path / "model"
    work = tmp_path / "work"
    args = ["--smoke", "--device", "cpu", "--out", str(out), "--work-dir", str(work)]
    assert main([*args, "--steps", "2", "--grounding-weight", "0"]) == 0
    assert (work / "checkpoint.pt").exists()
    # Resume: the VAE is done, two more UNet steps.
    info = json.loads((out / "training_info.json").read_text())
    assert "grounding" not in info["history_tail"][-1]  # switched off
    # Resume, the grounding loss on by default: two more UNet steps, the loss logged.
    resume = ["--stage", "unet", "--resume", "--steps", "4", "--eval-samples", "0"]
    assert main([*args, *resume, "--save-dtype", "float16"]) == 0
    saved = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float16}
    info = json.loads((out / "training_info.json").read_text())
    assert info["unet_step"] == 4 and info["vae_step"] == 4
    assert info["args"]["grounding_weight"] == 0.02
    assert 0 < info["history_tail"][-1]["grounding"] <= 1

    pipe = StableDiffusionPipeline.from_pretrained(out, dtype=torch.float32)
    assert pipe.vae_scale_factor == 4
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.scheduler.config.steps_offset == 1
    pipe.set_progress_bar_config(disable=True)
    result = pipe(
        "a red circle on a yellow background",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert result.images.shape == (1, 64, 64, 3)


def test_word_attention_compares_each_words_map_with_its_region():
    from p2p_framework import load_model
    from p2p_framework.demo import DEMO_MODEL_DIR
    from tools.demo_model.edit_quality import EVAL_SEED, word_attention
    from tools.demo_model.train import REGION_BACKGROUND, word_regions

    model = load_model(DEMO_MODEL_DIR, device="cpu", dtype="float32")
    before = {name: type(p) for name, p in model.unet.attn_processors.items()}
    found = word_attention(model, n=4, timesteps=(500,))
    assert [a.grid for a in found] == [16, 8, 4, 2]  # finest first, one row per layer grid
    # The areas are the ground truth's: the mean share of the image each named region covers.
    scenes = sample_scene_batch(np.random.default_rng([EVAL_SEED, 3]), 4)
    _, masks, _ = render_batch(scenes, 64)
    objects = masks.float().mean(dim=(2, 3)).numpy()
    background = 1 - masks.any(dim=1).float().mean(dim=(1, 2)).numpy()
    regions = word_regions(scenes, 77)
    object_areas = [objects[i, r] for i, row in enumerate(regions) for r in row if 0 <= r < 2]
    background_areas = [background[i] for i, row in enumerate(regions) for r in row if r == 2]
    assert REGION_BACKGROUND == 2
    for a in found:
        assert a.object_area == pytest.approx(np.mean(object_areas), rel=1e-5)
        assert a.background_area == pytest.approx(np.mean(background_areas), rel=1e-5)
        assert 0 < a.object_share < 1 and 0 < a.background_share < 1
    # The UNet's processors are given back.
    assert {name: type(p) for name, p in model.unet.attn_processors.items()} == before
