"""Meta-tests: every hook is documented with its exact signature, and has a test."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from p2p_framework import hookspecs

ROOT = Path(__file__).resolve().parent.parent


def hookspec_functions():
    marker = f"{hookspecs.PROJECT}_spec"
    return {
        name: fn
        for name, fn in vars(hookspecs).items()
        if inspect.isfunction(fn) and hasattr(fn, marker)
    }


def def_line(fn) -> str:
    source = inspect.getsource(fn)
    return " ".join(source[source.index("def ") : source.index(":\n") + 1].split())


def test_every_hookspec_is_documented_with_its_exact_signature():
    reference = (ROOT / "docs" / "hooks.md").read_text()
    specs = hookspec_functions()
    assert specs, "no hookspecs found"
    for name, fn in specs.items():
        assert f"## {name}" in reference, f"docs/hooks.md has no section for {name}"
        assert def_line(fn) in reference, f"docs/hooks.md shows another signature of {name}"
    documented = set(re.findall(r"^## (\w+)$", reference, flags=re.MULTILINE))
    assert documented == set(specs), "docs/hooks.md documents hooks that do not exist"


def test_every_hookspec_has_a_test():
    tests = "".join(
        p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_docs.py"
    )
    for name in hookspec_functions():
        assert re.search(rf"def {name}\(", tests), f"no test implements the hook {name}"


def test_documented_plugin_options_exist():
    # Parameter names in docs must be the code's (a peer's README used names its code ignored).
    from p2p_framework import EditSettings, RunContext
    from p2p_framework.registry import PluginRegistry

    text = (ROOT / "docs" / "plugins.md").read_text() + (
        ROOT / "docs" / "architecture.md"
    ).read_text()
    # run settings, and what RunContext tells an edit of them
    settings = set(EditSettings.__dataclass_fields__) | set(RunContext.__dataclass_fields__)
    for name in re.findall(r"`((?:cross|self)_replace_\w+)`", text):
        assert name in settings, name
    options = {o.name for p in PluginRegistry(entry_points=False).plugins() for o in p.options}
    for plugin, name in re.findall(r"`--set ([a-z][a-z-]*)\.([a-z_]+)=", text):
        assert name in (settings if plugin == "pipeline" else options), name


def test_per_step_protocol_signatures_are_the_codes():
    """The protocol block of docs/hooks.md names only methods that exist, with their
    parameter names in order."""
    from p2p_framework import Edit, EditRun, Filter, Source, StepGuide
    from p2p_framework.inversion import InvertingSource

    classes = {
        "Edit": Edit,
        "EditRun": EditRun,
        "Source": Source,
        "StepGuide": StepGuide,
        "InvertingSource": InvertingSource,
        "Filter": Filter,
    }
    reference = (ROOT / "docs" / "hooks.md").read_text()
    block = reference[reference.index("## The per-step protocol") :]
    current = None
    checked = 0
    for line in block.splitlines():
        header = re.match(r"class (\w+)", line)
        if header:
            current = classes[header.group(1)]
            continue
        method = re.match(r"\s+def (\w+)\(([^)]*)\)", line)
        if method and current is not None:
            name, params = method.groups()
            documented = [p.split(":")[0].strip() for p in params.split(",") if p.strip()]
            actual = list(inspect.signature(getattr(current, name)).parameters)
            assert documented == actual, f"{current.__name__}.{name}: {documented} != {actual}"
            checked += 1
    assert checked >= 10
