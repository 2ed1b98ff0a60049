"""p2p_framework.testing: the fixtures plugin authors use, kept out of the runtime path."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from p2p_framework import Edit, EditRun, PluginRegistry, StableDiffusionModel, hookimpl
from p2p_framework.errors import PluginError
from p2p_framework.testing import plugin_registered

ROOT = Path(__file__).resolve().parent.parent

#: Modules for tests and development that the runtime must never import.
DEV_MODULES = ("p2p_framework.testing", "tools")
DEV_MODULE_NAMES = ("tiny_models", "random_models", "edit_quality", "scoring", "train")

#: Source folders of the installed runtime: the core, the built-in plugins, inversion.
RUNTIME_DIRS = ("p2p_framework", "plugins", "inversion")


@dataclass(frozen=True)
class Unchanged(Edit):
    """An edit that changes nothing (the base class's hooks)."""

    name = "unchanged-for-test"

    word: str = "cat"

    def bind(self, run):
        return EditRun()


class UnchangedPlugin:
    @hookimpl
    def register_edits(self, register):
        register(Unchanged)


PLUGIN = UnchangedPlugin()


def test_runtime_path_does_not_import_testing_or_dev_tools(tmp_path: Path) -> None:
    # A fresh interpreter imports the CLI, every built-in plugin and inversion module, lists
    # the plugins and runs the documented edit on the demo model (2 steps), then reports
    # which modules were loaded.
    script = textwrap.dedent(
        """
        import json, pkgutil, sys, importlib
        import p2p_framework.cli as cli
        import p2p_framework.plugins, p2p_framework.inversion
        for package in (p2p_framework.plugins, p2p_framework.inversion):
            for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
                importlib.import_module(info.name)
        from p2p_framework.registry import PluginRegistry
        PluginRegistry(entry_points=False).plugins()
        for args in (
            ["plugins", "--json"],
            ["edit", "--prompt", "a blue circle on a striped green background",
             "--target", "a yellow circle on a striped green background",
             "--steps", "2", "--out", sys.argv[1]],
        ):
            cli.cli.main(args=args, prog_name="p2p-run", standalone_mode=False)
        print("\\nMODULES=" + json.dumps(sorted(sys.modules)))
        """
    )
    env = {**os.environ, "P2P_FRAMEWORK_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1"}
    env.pop("P2P_FRAMEWORK_MODEL", None)
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # not the repository root: tools/ must not be importable by accident
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "target-1.png").exists()
    modules = json.loads(done.stdout.rsplit("MODULES=", 1)[1])
    assert "p2p_framework.cli" in modules and "p2p_framework.plugins.replace" in modules
    loaded = [
        name
        for name in modules
        if name in DEV_MODULES
        or name.startswith(tuple(f"{m}." for m in DEV_MODULES))
        or (name.startswith("p2p_framework.") and name.rsplit(".", 1)[1] in DEV_MODULE_NAMES)
    ]
    assert loaded == []


def test_no_runtime_source_imports_testing_or_tools() -> None:
    # Also imports inside functions that the run above did not reach.
    offending = []
    for folder in RUNTIME_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            if (ROOT / "p2p_framework" / "testing") in path.parents:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = "." * node.level + (node.module or "")
                    names = [base] + [f"{base}.{alias.name}" for alias in node.names]
                else:
                    continue
                for name in names:
                    parts = name.lstrip(".").split(".")
                    if name.startswith("tools") or "testing" in parts:
                        offending.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert offending == []


def test_tools_and_fixtures_stay_out_of_the_wheel() -> None:
    import tomllib  # Python 3.11+; the check is about the repository's own config

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = config["packages"]
    assert "p2p_framework.testing" in packages
    assert not any(p == "tools" or p.startswith("tools.") for p in packages)
    assert not (ROOT / "p2p_framework" / "demo" / "train.py").exists()
    assert not (ROOT / "p2p_framework" / "tiny_models.py").exists()


# -- the fixtures of p2p_framework.testing.fixtures, as this suite gets them ------------------


def test_tiny_model_fixture_is_loaded_on_the_cpu_in_float32(
    tiny_model: StableDiffusionModel, tiny_model_dir: Path
) -> None:
    assert (tiny_model_dir / "model_index.json").exists()
    assert tiny_model.device.type == "cpu"
    assert tiny_model.dtype.is_floating_point and tiny_model.dtype.itemsize == 4


def test_registry_fixture_has_the_builtins_only(registry: PluginRegistry) -> None:
    names = {info.name for info in registry.plugins("edit")}
    assert {"replace", "refine", "reweight", "local-blend"} <= names
    assert "suppress-word" not in names  # the installed example plugin is not loaded
    assert all(info.package == "p2p-framework" for info in registry.plugins())


def test_register_plugin_adds_a_plugin_for_one_test(registry, register_plugin) -> None:
    name = register_plugin(PLUGIN, name="suppress", package="pkg", version="2")
    assert name == "suppress"
    info = registry.get("edit", "unchanged-for-test")
    assert (info.package, info.version) == ("pkg", "2")
    with pytest.raises(PluginError, match="already registered"):
        register_plugin(PLUGIN, name="suppress")


def test_plugin_registered_removes_the_plugin_even_on_an_error(registry) -> None:
    with pytest.raises(RuntimeError), plugin_registered(registry, PLUGIN) as name:
        assert registry.get("edit", "unchanged-for-test").plugin == name
        raise RuntimeError("test body failed")
    with pytest.raises(PluginError, match="unknown edit plugin"):
        registry.get("edit", "unchanged-for-test")

    class Misspelled:
        @hookimpl
        def register_edit(self, register):  # not a hook: register_edits
            pass

    with pytest.raises(PluginError), plugin_registered(registry, Misspelled()):
        pass


def test_a_plugin_package_uses_the_fixtures_from_its_conftest(pytester: pytest.Pytester) -> None:
    # What docs/plugins.md tells a third-party package to write, run as its own pytest session.
    pytester.makeconftest('pytest_plugins = ["p2p_framework.testing.fixtures"]\n')
    pytester.makepyfile(
        test_mine="""
        from dataclasses import dataclass

        from p2p_framework import Edit, EditRun, EditSettings, hookimpl, run_edit

        @dataclass(frozen=True)
        class Unchanged(Edit):
            name = "unchanged-for-test"

            def bind(self, run):
                return EditRun()

        class Plugin:
            @hookimpl
            def register_edits(self, register):
                register(Unchanged)

        def test_first(registry, register_plugin, tiny_model):
            register_plugin(Plugin(), name="mine")
            edit = registry.build("edit", "unchanged-for-test")
            prompts = ["a photo of a cat"] * 2
            result = run_edit(tiny_model, prompts, [edit], settings=EditSettings(steps=2))
            assert len(result.images) == 2

        def test_second(registry):
            names = {info.name for info in registry.plugins("edit")}
            assert "unchanged-for-test" not in names  # removed after test_first
        """
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


# Slow (about 30 s): .ci/run also runs the package's tests directly, as its author would.
@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("p2p_example_plugin") is None,
    reason="the example plugin package is not installed "
    "(pip install ./docs/examples/p2p-example-plugin)",
)
def test_the_example_plugin_packages_own_tests_pass() -> None:
    # A third-party package's test session, from its own folder and configuration.
    folder = ROOT / "docs" / "examples" / "p2p-example-plugin"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        env=env,
        cwd=folder,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"rootdir: {folder}" in done.stdout and " passed" in done.stdout


def test_the_documented_trainer_command_runs_from_the_repository_root() -> None:
    # docs/demo-model.md: `python -m tools.demo_model.train --help` from the repository root.
    done = subprocess.run(
        [sys.executable, "-m", "tools.demo_model.train", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m tools.demo_model.train")


def test_plugins_md_documents_the_fixtures_and_helpers_that_exist() -> None:
    import inspect

    import p2p_framework.testing as testing
    from p2p_framework.testing import fixtures

    text = (ROOT / "docs" / "plugins.md").read_text()
    section = text[text.index("## Testing your plugin") :]
    table = re.findall(r"^\| `(\w+)` \| (session|test) \|", section, flags=re.MULTILINE)
    assert {name for name, _ in table} == set(fixtures.__all__)
    for name, scope in table:
        marker = getattr(fixtures, name)._fixture_function_marker
        assert marker.scope == ("function" if scope == "test" else scope), name
    documented = re.findall(r"^- `(\w+)\(([^`]*)\)", section, flags=re.MULTILINE)
    assert {name for name, _ in documented} >= {"save_tiny_pipeline", "plugin_registered"}
    for name, arguments in documented:
        parameters = list(inspect.signature(getattr(testing, name)).parameters)
        shown = [a.split("=")[0].strip() for a in arguments.replace("\n", " ").split(",")]
        assert [a for a in shown if a != "*"] == parameters, name
