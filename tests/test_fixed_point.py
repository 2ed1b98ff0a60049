"""The example package's ``fixed-point`` source: a third-party inversion, from outside.

On the demo model it must reconstruct a photo at guidance 7.5 better than DDIM inversion, and
work with ``p2p-run invert --method fixed-point`` and ``p2p-run edit --inversion``.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from p2p_framework import EditSettings, PluginRegistry, load_model, run_edit
from p2p_framework.cli import cli
from p2p_framework.inversion import Inversion

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("p2p_example_plugin") is None,
    reason="the example plugin package is not installed "
    "(pip install ./docs/examples/p2p-example-plugin)",
)


def _psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(10 * np.log10(255.0**2 / np.mean((x - y) ** 2)))


@pytest.fixture(scope="module")
def registry() -> PluginRegistry:
    """Built-ins plus the example package's fixed-point module, as its entry point adds it."""
    from p2p_example_plugin import fixed_point

    registry = PluginRegistry(entry_points=False)
    registry.add(fixed_point, name="fixed_point", package="p2p-example-plugin")
    return registry


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Image.Image]:
    """A demo scene the demo model never generated (as tests/test_inversion_precision.py)."""
    from p2p_framework.demo.shapes import render
    from tools.demo_model import edit_quality as eq

    case = eq.sample_photo_cases(1)[0]
    image, _ = render(case.scene, size=64)
    path = tmp_path_factory.mktemp("fixed-point") / "scene.png"
    image.save(path)
    return path, case.source, image


@pytest.fixture(scope="module")
def demo_model():
    from p2p_framework.demo import DEMO_MODEL_DIR

    return load_model(DEMO_MODEL_DIR, device="cpu", dtype="float32")


def test_registered_through_the_entry_point() -> None:
    from p2p_framework.inversion import invertible_sources

    # The installed package's entry point, as a user's process loads it.
    assert "fixed-point" in invertible_sources(PluginRegistry())


@pytest.mark.slow  # a quality test on the demo model (about 50 s)
def test_fixed_point_beats_ddim_at_guidance_on_the_demo_model(registry, demo_model, scene):
    path, prompt, image = scene
    found = {}
    for name in ("ddim", "fixed-point"):
        source = registry.build("source", name, {"image": str(path), "cache": False})
        began = time.perf_counter()
        result = run_edit(demo_model, [prompt], source=source, settings=EditSettings(steps=50))
        seconds = time.perf_counter() - began
        found[name] = _psnr(result.images[0], image)
        info = result.source_info["inversion"]
        print(
            f"{name}: {found[name]:.2f} dB, inversion {info['seconds']:.2f} s, run {seconds:.2f} s"
        )
    assert info["method"] == "fixed-point" and info["options"] == {"iterations": 5}
    assert len(info["residual"]) == 50
    # Measured 2026-12-01 (docs/benchmarks.md): DDIM about 24 dB, fixed-point about 30 dB.
    assert found["fixed-point"] > found["ddim"] + 3.0, found


def test_invert_save_and_edit_from_the_command_line(registry, scene, tmp_path, monkeypatch):
    monkeypatch.delenv("P2P_FRAMEWORK_MODEL", raising=False)  # the demo model
    path, prompt, image = scene
    fast = ["--steps", "20", "--device", "cpu", "--dtype", "float32"]
    saved = tmp_path / "scene.p2pinv"
    runner = CliRunner()
    args = ["invert", "--image", path, "--prompt", prompt, "--method", "fixed-point"]
    args += ["--set", "fixed-point.iterations=2", "--out", saved, *fast]
    result = runner.invoke(cli, [str(a) for a in args], obj=registry)
    assert result.exit_code == 0, result.output
    inversion = Inversion.load(saved)
    assert inversion.method == "fixed-point" and inversion.options == {"iterations": 2}
    assert inversion.guidance == 7.5 and inversion.num_steps == 20
    target = prompt.split()
    target[1] = "purple" if target[1] != "purple" else "orange"  # "a COLOUR shape ..."
    out = tmp_path / "edit"
    args = ["edit", "--inversion", saved, "--prompt", prompt, "--target", " ".join(target)]
    args += ["--out", out, "--json", "-q", *fast]
    result = runner.invoke(cli, [str(a) for a in args], obj=registry)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["source"]["name"] == "fixed-point"
    assert record["source_info"]["inversion"]["cache"] == "file"
    # The source image comes back (DDIM inversion at 20 steps: about 19 dB; see benchmarks.md).
    reconstruction = Image.open(out / "source.png").convert("RGB")
    assert _psnr(reconstruction, image) > 25.0
    # A run at another guidance is refused: the inversion solved the guided steps.
    args = ["edit", "--inversion", saved, "--prompt", prompt, "--guidance", "5"]
    args += ["--out", tmp_path / "other", *fast]
    result = runner.invoke(cli, [str(a) for a in args], obj=registry)
    assert result.exit_code == 2 and "guidance 7.5" in result.output
