"""The package's layout holds: the loss core imports neither the Hugging Face integration
nor the experiment (nor transformers), the integration does not import the experiment,
and no module of the package imports itself back through others."""

import ast
import graphlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import hardfocus_fused
import hardfocus_fused.kernels

PACKAGE = "hardfocus_fused"
INTEGRATION = f"{PACKAGE}.hf"
EXPERIMENT = f"{PACKAGE}.experiment"


def _module_files() -> dict[str, Path]:
    """Every module of the package by dotted name, ``kernels`` included (a namespace
    subpackage, installed from the top-level folder through ``package_dir``)."""
    roots = {
        PACKAGE: Path(hardfocus_fused.__file__).parent,
        f"{PACKAGE}.kernels": Path(next(iter(hardfocus_fused.kernels.__path__))),
    }
    files = {}
    for prefix, root in roots.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join((prefix, *parts))] = path
    return files


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source (function-level
    imports included: that is where cycles hide).  ``from P import x`` counts as importing
    ``P.x`` when that is a module, else ``P``."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source for alias in node.names
            ]
        else:
            continue
        found.update(target for target in targets if target in modules and target != name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = _module_files()
    return {name: _imports(name, path, set(files)) for name, path in files.items()}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_graph_sees_the_layout(graph):
    """The checks below can fail: the graph has the edges we know exist."""
    assert f"{INTEGRATION}.parts" in graph[f"{INTEGRATION}.patch"]
    assert f"{PACKAGE}.loss" in graph[f"{INTEGRATION}.patch"]
    assert f"{PACKAGE}.kernels.forward" in graph[f"{PACKAGE}.op.triton_path"]
    assert f"{INTEGRATION}" in graph[f"{EXPERIMENT}.train"]


def test_no_import_cycle(graph):
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")


def test_a_cycle_would_be_found(graph):
    """The old ``hf`` <-> ``hf_patch`` kind of cycle, put back by hand, is caught."""
    broken = dict(graph)
    broken[f"{INTEGRATION}.parts"] = graph[f"{INTEGRATION}.parts"] | {f"{INTEGRATION}.patch"}
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter(broken).prepare()


def test_core_imports_neither_integration_nor_experiment(graph):
    core = [name for name in graph if not name.startswith((INTEGRATION, EXPERIMENT, f"{PACKAGE}.demo"))]
    assert f"{PACKAGE}.loss" in core and f"{PACKAGE}.kernels.forward" in core
    for name in core:
        wrong = {m for m in _reachable(graph, name) if m.startswith((INTEGRATION, EXPERIMENT))}
        assert not wrong, f"{name} imports {sorted(wrong)}"
    for name in graph:
        if name.startswith(INTEGRATION):
            wrong = {m for m in _reachable(graph, name) if m.startswith(EXPERIMENT)}
            assert not wrong, f"{name} imports {sorted(wrong)}"


def test_core_and_patch_work_without_transformers():
    """With transformers (and TRL) unimportable, the core computes a loss with gradients,
    imports nothing of the integration or the experiment, and ``apply_hardfocus`` is still
    importable (it needs transformers only for the model it is given)."""
    script = textwrap.dedent("""
        import sys
        sys.modules["transformers"] = None      # any import of it raises ImportError
        sys.modules["trl"] = None
        import torch
        import hardfocus_fused
        from hardfocus_fused import hardfocus_loss, linear_cross_entropy
        hidden = torch.randn(2, 6, 8, requires_grad=True)
        weight = torch.randn(16, 8, requires_grad=True)
        labels = torch.randint(0, 16, (2, 6))
        hardfocus_loss(hidden, weight, labels, method="irdro", impl="torch").backward()
        assert hidden.grad is not None and weight.grad is not None
        loaded = sorted(m for m in sys.modules if m.startswith(("hardfocus_fused.hf", "hardfocus_fused.experiment")))
        assert not loaded, loaded
        from hardfocus_fused import apply_hardfocus, remove_hardfocus, hardfocus_patch
        try:
            from hardfocus_fused import HardFocusCallback
        except ImportError:
            pass
        else:
            raise AssertionError("HardFocusCallback imported without transformers")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


def test_public_names_still_exported():
    for name in hardfocus_fused.__all__:
        assert getattr(hardfocus_fused, name) is not None
    assert set(hardfocus_fused.__all__) <= set(dir(hardfocus_fused))
    from hardfocus_fused.hf.trl import HardFocusSFTTrainer  # noqa: F401

    with pytest.raises(AttributeError, match="no attribute"):
        hardfocus_fused.not_a_name  # noqa: B018


def test_demo_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "hardfocus_fused.demo", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout
