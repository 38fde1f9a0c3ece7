"""Nothing in this repository hides Hugging Face's ``kernels`` package, and our kernels are
found as ``hardfocus_fused.kernels`` from a wheel, an editable install and a plain checkout.

transformers (5.25 on) imports Hugging Face's ``kernels`` when a model module loads.  Our
Triton kernels live in the repository's top-level ``kernels/`` folder, which has no
``__init__.py`` so that, with the repository root first on ``sys.path`` (``python -m``, a
REPL, spawned ranks), an installed ``kernels`` still wins (README, "Layout")."""

import importlib.metadata
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _run(script: str, cwd: Path, timeout: int = 300) -> str:
    """``script`` in a new interpreter with ``cwd`` as its working directory (first on
    ``sys.path`` for ``-c``, as for ``python -m`` and a REPL); its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_kernels_folder_is_not_a_regular_package():
    assert (ROOT / "kernels" / "forward.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py would make `import kernels` from the repository root find ours, not Hugging Face's"
    )


def test_import_kernels_from_the_repository_root_finds_hugging_face_and_a_model_builds():
    """From the root, ``import kernels`` is Hugging Face's (when installed), and a tiny
    ``LlamaForCausalLM`` builds and runs: what failed with transformers 5.25."""
    pytest.importorskip("transformers")
    out = _run(
        """
        import sys
        from pathlib import Path
        assert sys.path[0] in ("", str(Path.cwd())), sys.path[:2]
        try:
            import kernels
        except ImportError:
            where = "absent"
        else:
            where = str(Path(kernels.__file__).resolve()) if getattr(kernels, "__file__", None) else "namespace"
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
        model = LlamaForCausalLM(config)
        ids = torch.randint(0, 32, (1, 5))
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
        print(where)
    """,
        ROOT,
    )
    where = out.strip().splitlines()[-1]
    if _hf_kernels_installed():
        assert where not in ("absent", "namespace") and not where.startswith(str(ROOT) + "/"), where
    else:
        assert where in ("absent", "namespace"), where  # our folder, if anything: no module code


def _copy_package(to: Path, kernels_inside: bool) -> None:
    """The package as a plain checkout has it (``kernels/`` beside it) or as a wheel has it
    (``hardfocus_fused/kernels/``)."""
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "hardfocus_fused", to / "hardfocus_fused", ignore=ignore)
    shutil.copytree(ROOT / "kernels", to / ("hardfocus_fused/kernels" if kernels_inside else "kernels"), ignore=ignore)


@pytest.mark.parametrize("layout", ["checkout", "wheel"])
def test_kernels_are_found_in_either_layout(tmp_path, layout):
    """Run from a copy laid out as a checkout or as a wheel: ``hardfocus_fused.kernels`` is
    the copy's, and the Triton path computes a loss through it in the interpreter."""
    pytest.importorskip("triton")
    _copy_package(tmp_path, kernels_inside=layout == "wheel")
    out = _run(
        """
        import os
        os.environ["TRITON_INTERPRET"] = "1"
        import torch
        import hardfocus_fused
        import hardfocus_fused.kernels.forward as forward
        from hardfocus_fused import linear_cross_entropy
        h, w = torch.randn(8, 16), torch.randn(32, 16)
        y = torch.randint(0, 32, (8,))
        got = linear_cross_entropy(h, w, y, impl="triton", reduction="sum")
        want = torch.nn.functional.cross_entropy(h @ w.T, y, reduction="sum")
        assert torch.allclose(got, want, atol=1e-4), (got, want)
        print(hardfocus_fused.__file__)
        print(forward.__file__)
    """,
        tmp_path,
    )
    package_file, forward_file = out.strip().splitlines()[-2:]
    assert package_file.startswith(str(tmp_path)) and forward_file.startswith(str(tmp_path))
    want = "hardfocus_fused/kernels/forward.py" if layout == "wheel" else "kernels/forward.py"
    assert Path(forward_file).relative_to(tmp_path).as_posix() == want


def test_the_installed_package_finds_its_kernels_from_elsewhere(tmp_path):
    """The installed package (editable in CI, or a wheel) from an unrelated directory."""
    out = _run(
        """
        import hardfocus_fused.kernels.config as config
        print(config.__file__)
    """,
        tmp_path,
    )
    assert Path(out.strip().splitlines()[-1]).name == "config.py"


@pytest.mark.slow
def test_the_wheel_holds_the_kernels_under_the_package_and_no_top_level_kernels(tmp_path):
    """``pip wheel --no-deps .`` from a clean copy of the sources (a build folder left in the
    checkout would be reused)."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        source.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    for name in ("hardfocus_fused", "kernels"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0 and "No module named" in result.stderr:
        pytest.skip(f"cannot build without isolation here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("hardfocus_fused-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"hardfocus_fused", next(t for t in tops if t.endswith(".dist-info"))}, tops
    package = {path.relative_to(ROOT).as_posix() for path in (ROOT / "hardfocus_fused").rglob("*.py")}
    assert package <= set(names), sorted(package - set(names))  # every subpackage is listed
    kernels = {Path(name).name for name in names if name.startswith("hardfocus_fused/kernels/")}
    assert {path.name for path in (ROOT / "kernels").glob("*.py")} <= kernels
    assert "__init__.py" not in kernels
    top_level = next((n for n in names if n.endswith(".dist-info/top_level.txt")), None)
    if top_level is not None:
        assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["hardfocus_fused"]
