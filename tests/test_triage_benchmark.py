"""The triage benchmark's findings cache: re-examined when a gate tool's weights or code change."""

import importlib.util
import shutil
from pathlib import Path

from ophglm.settings import Settings
from ophglm.tools.anatomy import DISC_CUP_FILE
from ophglm.tools.classify_fundus import CLASSIFIER_FILE
from ophglm.tools.segment_lesions import SEGMENTER_FILE
from ophglm.tools.vision import weights_path

BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "triage.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("triage_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_findings_cache_is_keyed_by_every_gate_weights_file_and_the_tools_code(tmp_path, monkeypatch):
    benchmark = _benchmark()
    for name in (CLASSIFIER_FILE, SEGMENTER_FILE, DISC_CUP_FILE):
        shutil.copy(weights_path(name), tmp_path / name)
    settings = Settings(weights_dir=str(tmp_path))
    before = benchmark.tools_version(settings)
    assert benchmark.tools_version(settings) == before
    with open(tmp_path / DISC_CUP_FILE, "ab") as f:  # other disc/cup weights: the CDRs the table reads change
        f.write(b"\0")
    benchmark.weights_fingerprint.cache_clear()
    changed_weights = benchmark.tools_version(settings)
    assert changed_weights != before
    original = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: original(p) + (b"# edited" if p.name == "anatomy.py" else b""))
    assert benchmark.tools_version(settings) != changed_weights, "a change to a tool's code re-examines the photographs"
    assert benchmark.tools_version(Settings(weights_dir=str(tmp_path), lesion_views=1)) != benchmark.tools_version(settings)
