"""One settings object for every scale OphGLM runs at.

Laptop, GPU server and fleet differ only in configuration (DESIGN.md, "Where it runs"), so
every switch lives here: defaults, then an optional TOML file, then `OPHGLM_*` environment
variables, each later source overriding the earlier one.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ophglm.session import MAX_PIXELS

LLM_BACKENDS = ("local", "openai")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ROUTERS = ("knowledge", "vessels")


def packaged_llm_weights() -> Path:
    """Where the shipped LoRA adapters and fusion projector live (inside the installed package)."""
    from importlib import resources

    return Path(str(resources.files("ophglm.agent") / "weights"))


def _default_cache_dir() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ophglm")


@dataclass
class Settings:
    # "local": a transformers model in this process; "openai": any OpenAI-compatible server (vLLM).
    llm_backend: str = "local"
    # local backend: "smollm2" or "qwen2.5-coder-0.5b" (packaged GGUFs, converted once into cache_dir) or a folder with HF weights.
    llm_model: str = "smollm2"
    # local backend: a folder holding a LoRA adapter to apply on top of llm_model; "auto" = the
    # adapter shipped for a packaged model (agent/weights/<model>-lora) if there is one; "" = none.
    llm_adapter: str = "auto"
    # local backend: the fusion projector (image -> soft tokens); "auto" = the shipped one when it
    # was trained for this model and adapter; "" = none.
    fusion: str = "auto"
    # openai backend: base URL (e.g. http://localhost:8000/v1), served model name and key.
    llm_base_url: str = ""
    llm_served_model: str = "ophglm"
    llm_api_key: str = "EMPTY"
    # Upper bound on tokens the LLM writes per step: small models ramble.
    llm_max_new_tokens: int = 160
    # A tool call that has not returned after this many seconds is reported as failed; the turn goes on.
    tool_timeout_s: float = 120.0
    # URL of an OphGLM tool server ("" = run the vision tools in this process).
    tools_url: str = ""
    # MCP servers whose tools the agent may call: langchain-mcp-adapters' connections dict,
    # as JSON, the path of a JSON file, or a TOML table ("" = none).
    mcp_servers: str | dict = ""
    # Third-party HTTP tool servers speaking the tool server's protocol, comma-separated URLs ("" = none).
    http_tools: str = ""
    # Chroma: a local folder (embedded PersistentClient) unless chroma_url names a server.
    chroma_path: str = ""
    chroma_url: str = ""
    # Trained vision weights; "" = the weights shipped inside the package.
    weights_dir: str = ""
    # Converted LLMs, the default Chroma folder and other rebuildable state.
    cache_dir: str = field(default_factory=_default_cache_dir)
    # Optional ImageNet/pretrained ConvNeXt checkpoint for users who train that backbone.
    convnext_checkpoint: str = ""
    device: str = "auto"
    dtype: str = "auto"
    # segment_lesions: flip views averaged per photograph (1-4); 4 lifts every lesion class's AUPR at 4x its forward time.
    lesion_views: int = 4
    # Pipeline routers that run a tool in the model's stead (agent/routers.py), comma-separated:
    # "knowledge" (retrieve for every question, refuse off-topic text) and "vessels" (a question naming the
    # vessels measures them). "" = none: the model alone decides those calls (what `eval agent` measures).
    routers: str = "knowledge,vessels"
    # CPU threads for torch (0 = leave torch's default).
    threads: int = 0
    # `ophglm serve`: the key clients send (Bearer or X-API-Key); required to listen beyond loopback.
    api_key: str = ""
    # `ophglm serve`: the largest photograph accepted, in bytes and in pixels (width x height).
    max_upload_bytes: int = 20_000_000
    max_upload_pixels: int = MAX_PIXELS
    # `ophglm serve`: SQLite file keeping conversations (text and findings, never images) across restarts;
    # "" = <cache_dir>/sessions.sqlite, ":memory:" = keep nothing on disk.
    sessions_db: str = ""

    def __post_init__(self) -> None:
        if self.llm_backend not in LLM_BACKENDS:
            raise ValueError(f"llm_backend must be one of {LLM_BACKENDS}, got {self.llm_backend!r}")
        if self.llm_backend == "openai" and not self.llm_base_url:
            raise ValueError("llm_backend 'openai' needs llm_base_url (OPHGLM_LLM_BASE_URL)")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if unknown := set(self.router_names) - set(ROUTERS):
            raise ValueError(f"routers must be among {ROUTERS}, got {', '.join(sorted(unknown))}")
        if not 1 <= self.lesion_views <= 4:
            raise ValueError(f"lesion_views must be 1 to 4 (flip views averaged), got {self.lesion_views}")

    @property
    def router_names(self) -> tuple[str, ...]:
        return tuple(r.strip() for r in self.routers.split(",") if r.strip())

    def resolved_llm_adapter(self) -> str:
        if self.llm_adapter != "auto":
            return self.llm_adapter
        shipped = packaged_llm_weights() / f"{self.llm_model}-lora"
        return str(shipped) if (shipped / "adapter_config.json").is_file() else ""

    def resolved_fusion(self) -> str:
        """The projector file, or '' when none fits this model, adapter and classifier (a mismatched one would mislead)."""
        if self.fusion != "auto":
            return self.fusion
        shipped = packaged_llm_weights() / "fusion_projector.safetensors"
        if self.llm_backend != "local" or not shipped.is_file():
            return ""
        from ophglm.tools.vision import weights_config

        config = weights_config(shipped)
        adapter = self.resolved_llm_adapter()
        if config["llm_model"] != self.llm_model or config["llm_adapter"] != (Path(adapter).name if adapter else ""):
            return ""
        from ophglm.tools.classify_fundus import CLASSIFIER_FILE
        from ophglm.tools.vision import weights_fingerprint, weights_path

        try:
            encoder = weights_fingerprint(weights_path(CLASSIFIER_FILE, self.weights_dir))
        except FileNotFoundError:
            return ""  # no classifier, no image features to project
        return str(shipped) if config.get("image_encoder_sha256") in (None, encoder) else ""

    @property
    def chroma_folder(self) -> Path:
        return Path(self.chroma_path) if self.chroma_path else Path(self.cache_dir) / "chroma"

    def torch_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def torch_dtype(self, device: str | None = None):
        """bf16 on GPUs and on CPUs with native bf16 (about 2x faster here), else fp32."""
        import torch

        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        device = device or self.torch_device()
        return torch.bfloat16 if device == "cuda" or cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 / AMX): there bf16 is ~2x faster than fp32;
    elsewhere (AVX2 only) it is emulated, and `benchmarks/bf16_cpu.py` measured a training step 3x and a
    forward 8x slower than fp32, so training and inference keep fp32."""
    import torch

    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _coerce(value: str, target: object) -> object:
    if isinstance(target, bool):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(target, int):
        return int(value)
    if isinstance(target, float):
        return float(value)
    return value


def load_settings(config_file: str | Path | None = None, **overrides) -> Settings:
    """Defaults < TOML file (`config_file`, else $OPHGLM_CONFIG) < OPHGLM_* variables < overrides."""
    names = {f.name for f in dataclasses.fields(Settings)}
    values: dict[str, object] = {}
    path = config_file or os.environ.get("OPHGLM_CONFIG")
    if path:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"settings file not found: {path}")
        with path.open("rb") as f:
            table = tomllib.load(f)
        unknown = set(table) - names
        if unknown:
            raise ValueError(f"unknown settings in {path}: {', '.join(sorted(unknown))}")
        values.update(table)
    defaults = Settings()
    for name in names:
        env = os.environ.get(f"OPHGLM_{name.upper()}")
        if env is not None:
            try:
                values[name] = _coerce(env, getattr(defaults, name))
            except ValueError:
                raise ValueError(f"OPHGLM_{name.upper()}={env!r} is not a valid {type(getattr(defaults, name)).__name__}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)
