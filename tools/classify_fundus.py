"""`classify_fundus`: calibrated disease probabilities for one colour fundus photograph.

A timm classifier (the shipped weights' backbone and classes are in their metadata and
model card). The shipped weights are multi-label: one calibrated sigmoid per class, so
"glaucoma 0.82" means about 82% of such photographs have glaucoma, whatever else they
have, and the probabilities need not sum to one. Weights with softmax outputs (a fitted
temperature in their metadata) still load.
"""

from __future__ import annotations

import torch
from PIL import Image

from ophglm.session import Session
from ophglm.tools.assess_quality import gradable_photo
from ophglm.tools.base import ImageInput, Tool, ToolResult
from ophglm.tools.vision import Photo, as_photo, load_weights, weights_path

CLASSIFIER_FILE = "fundus_classifier.safetensors"
LABELS = {
    "normal": "no referable disease",
    "diabetic_retinopathy": "diabetic retinopathy",
    "glaucoma": "glaucoma (suspect optic disc)",
    "cataract": "cataract (hazy view)",
    "pathologic_myopia": "pathologic myopia",
    "amd": "age-related macular degeneration",
    "hypertensive_retinopathy": "hypertensive retinopathy",
}


def probabilities_of(found: dict) -> dict[str, float]:
    """Class -> probability from this tool's findings ({} when it did not run)."""
    return {c: p["value"] for c, p in found.get("probabilities", {}).items()}


class ClassifyFundus(Tool):
    name = "classify_fundus"
    description = (
        "Estimate the probability of each fundus disease the classifier knows (for example normal, "
        "diabetic retinopathy, glaucoma, cataract, pathologic myopia) for one colour fundus photograph "
        "of this session. Use it to answer 'is something wrong with this eye?' or 'is this glaucoma?'."
    )
    inputs = ImageInput

    def __init__(self, weights_dir: str = "", device: str = "cpu"):
        super().__init__()
        self.weights_dir, self.device = weights_dir, device

    def setup(self) -> None:
        self.model, self.config = load_weights(weights_path(CLASSIFIER_FILE, self.weights_dir), self.device)

    @torch.inference_mode()
    def predict(self, images: list[Image.Image | Photo]) -> list[dict[str, float]]:
        """Batched path: calibrated probabilities per class for each photograph (a PIL image, or a session's Photo)."""
        size, classes = self.config["image_size"], self.config["classes"]
        batch = torch.stack([as_photo(im).tensor(size) for im in images]).to(self.device)
        logits = self.model(batch).float().cpu()
        if self.config.get("outputs") == "sigmoid":
            calibration = self.config["calibration"]
            probs = torch.sigmoid(logits * torch.tensor(calibration["scale"]) + torch.tensor(calibration["bias"]))
        else:
            probs = (logits / self.config["temperature"]).softmax(dim=1)
        return [{c: float(p[i]) for i, c in enumerate(classes)} for p in probs]

    def run(self, inputs: ImageInput, session: Session) -> ToolResult:
        return self.run_batch([(inputs, session)])[0]

    def run_batch(self, calls: list[tuple[ImageInput, Session]]) -> list[ToolResult]:
        """One forward pass for the whole batch (the tool server batches concurrent calls)."""
        photos = [gradable_photo(session, inputs.image_id, self.name) for inputs, session in calls]
        return [self._result(inputs.image_id, probs) for (inputs, _), probs in zip(calls, self.predict(photos))]

    def _result(self, image_id: str, probs: dict[str, float]) -> ToolResult:
        ranked = sorted(probs.items(), key=lambda kv: -kv[1])
        top, top_p = ranked[0]
        findings = {
            "image_id": image_id,
            "probabilities": {c: {"value": round(p, 3), "unit": "probability"} for c, p in ranked},
            "most_likely": top,
            "confident": top_p >= 0.6,
            "classes_known": list(probs),
            "model": f"{self.config['backbone']} ({len(probs)} classes)",
        }
        listed = ", ".join(f"{LABELS.get(c, c)} {p:.2f}" for c, p in ranked)
        hedge = "" if top_p >= 0.6 else " The classifier is unsure (no class reaches 0.60)."
        summary = f"Disease probabilities for {image_id}: {listed}. Most likely: {LABELS.get(top, top)} ({top_p:.2f}).{hedge}"
        return ToolResult(summary=summary, findings=findings)
