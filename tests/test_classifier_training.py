"""The classifier trains, calibrates and writes a card whose commands rebuild its weights,
including the runs it continued from."""

from __future__ import annotations

from ophglm.finetune.datasets import split_of
from ophglm.finetune.train_classifier import ClassifierConfig, train_classifier
from ophglm.tools.synthetic_fundus import make_synthetic_fundus
from ophglm.tools.vision import load_weights

LABELS = ("normal", "diabetic_retinopathy", "glaucoma", "cataract")


def _photographs(root, per_split: dict[str, int]) -> None:
    seed = 0
    for label in LABELS:
        folder = root / "classify_4class" / label
        folder.mkdir(parents=True)
        for split, count in per_split.items():
            n = 0
            while count:
                n += 1
                if split_of(f"{label}:{split}{n}") == split:
                    seed += 1
                    make_synthetic_fundus(96, seed=seed, lesions=label != "normal").image.save(folder / f"{split}{n}.png")
                    count -= 1


def test_continued_training_keeps_the_commands_of_the_run_it_continued(tmp_path):
    root = tmp_path / "data"
    _photographs(root, {"train": 2, "val": 1})
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    report = train_classifier(ClassifierConfig(data=str(root), out=str(first), image_size=64, batch_size=4, minutes=0.02))
    assert report["train_images"] == 8 and report["validation_images"] == 4 and 0.0 <= report["macro_auroc"] <= 1.0
    _, config = load_weights(first)
    first_commands = config["reproduce"]
    assert first_commands == ["ophglm train classifier --data ../shared/data --backbone efficientnet_lite0 --image-size 64 --minutes 0.02"]

    train_classifier(ClassifierConfig(data=str(root), out=str(second), image_size=80, batch_size=4, minutes=0.02, lr=3e-4, pretrained=str(first)))
    _, config = load_weights(second)
    assert config["reproduce"][:1] == first_commands and len(config["reproduce"]) == 2
    assert config["reproduce"][1].endswith(f"--image-size 80 --minutes 0.02 --lr 0.0003 --pretrained {first}")
    card = second.with_suffix(".md").read_text()
    assert all(command in card for command in config["reproduce"])
    assert f"initialised from {first}, itself trained by the command before the last under Reproduce" in card

    # The card's own route: a run that writes over the checkpoint it continues from keeps the whole chain.
    train_classifier(ClassifierConfig(data=str(root), out=str(second), image_size=80, batch_size=4, minutes=0.02, pretrained=str(second)))
    load_weights.cache_clear()
    chain = load_weights(second)[1]["reproduce"]
    assert chain[:2] == config["reproduce"] and chain[2].endswith(f"--pretrained {second}") and len(chain) == 3
