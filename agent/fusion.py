"""Fusion tokens: the fundus photograph itself, as k soft tokens in the LLM's embedding space.

The classifier's backbone pools a photograph into one feature vector; a small projector
maps it to k vectors the size of the LLM's token embeddings. Where a conversation says a
photograph is attached, those vectors go into the prompt through `inputs_embeds` right
after the attachment line, so the LLM reads the image, not only what the tools said about
it. The projector is trained with the LLM frozen (`ophglm train fusion`) and shipped as
a small safetensors file whose metadata names the LLM and adapter it was trained for.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ATTACHED = re.compile(r"\[Fundus photograph attached: image_id=(img-[0-9a-f]+)\]")
FUSION_FILE = "fusion_projector.safetensors"


class FusionProjector(nn.Module):
    def __init__(self, feature_dim: int, embed_dim: int, tokens: int = 4, hidden: int = 1024):
        super().__init__()
        self.tokens, self.embed_dim = tokens, embed_dim
        self.net = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, tokens * embed_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).view(-1, self.tokens, self.embed_dim)


class ImageEncoder:
    """Pooled features of the shipped classifier's backbone (the same preprocessing as classify_fundus)."""

    def __init__(self, weights_dir: str = "", device: str = "cpu"):
        from ophglm.tools.classify_fundus import ClassifyFundus

        from ophglm.tools.classify_fundus import CLASSIFIER_FILE
        from ophglm.tools.vision import weights_fingerprint, weights_path

        self.tool = ClassifyFundus(weights_dir, device)
        self.tool.ensure_setup()
        self.feature_dim = self.tool.model.num_features
        self.fingerprint = weights_fingerprint(weights_path(CLASSIFIER_FILE, weights_dir))

    @torch.inference_mode()
    def __call__(self, images: list) -> torch.Tensor:
        """Features of PIL images or session Photos (whose aperture box and pixels are already found), from the classifier's own input."""
        from ophglm.tools.vision import as_photo

        size = self.tool.config["image_size"]
        batch = torch.stack([as_photo(im).tensor(size) for im in images]).to(self.tool.device)
        return self.tool.model.forward_head(self.tool.model.forward_features(batch), pre_logits=True).float()


@dataclass
class Fusion:
    projector: FusionProjector
    encoder: ImageEncoder
    config: dict

    def tokens(self, images: list) -> torch.Tensor:  # PIL images or session Photos
        with torch.inference_mode():
            return self.projector(self.encoder(images))


def fused_embeddings(text: str, tokenizer, embed: nn.Module, soft_tokens: Callable[[str], torch.Tensor | None]) -> torch.Tensor:
    """Prompt embeddings [1, T, D] with each attached photograph's soft tokens after its attachment line.

    `soft_tokens(image_id)` gives [k, D] or None (no fusion for that image: a rejected one).
    """
    pieces, position = [], 0
    for match in ATTACHED.finditer(text):
        tokens = soft_tokens(match.group(1))
        if tokens is None:
            continue
        pieces += [text[position:match.end()], tokens]
        position = match.end()
    pieces.append(text[position:])
    parts = []
    for piece in pieces:
        if isinstance(piece, str):
            ids = tokenizer(piece, add_special_tokens=False, return_tensors="pt")["input_ids"].to(embed.weight.device)
            parts.append(embed(ids)[0])
        else:
            parts.append(piece.to(embed.weight.device, embed.weight.dtype))
    return torch.cat(parts).unsqueeze(0)


def save_fusion(projector: FusionProjector, path: Path, config: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in projector.state_dict().items()}, str(path), metadata={"config": json.dumps(config)})


def load_fusion(path: Path, weights_dir: str = "", device: str = "cpu") -> Fusion:
    from safetensors.torch import load_file

    from ophglm.tools.vision import weights_config

    config = weights_config(path)
    encoder = ImageEncoder(weights_dir, device)
    if config.get("image_encoder_sha256", encoder.fingerprint) != encoder.fingerprint:
        # Features from other classifier weights are another language to the projector.
        raise ValueError(f"{path} was trained on the features of other classifier weights "
                         f"({config['image_encoder_sha256']}, these are {encoder.fingerprint}): retrain it with `ophglm train fusion`")
    projector = FusionProjector(config["feature_dim"], config["embed_dim"], config["tokens"], config["hidden"])
    projector.load_state_dict(load_file(str(path)))
    return Fusion(projector.to(device).eval(), encoder, config)
