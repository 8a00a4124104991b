import pytest

from ophglm.settings import load_settings


def test_defaults_run_locally_on_embedded_chroma(monkeypatch, tmp_path):
    for name in ("OPHGLM_LLM_BACKEND", "OPHGLM_CHROMA_URL", "OPHGLM_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    s = load_settings(cache_dir=str(tmp_path))
    assert s.llm_backend == "local" and s.llm_model == "smollm2"
    assert s.chroma_folder == tmp_path / "chroma"


def test_toml_then_environment_then_overrides(monkeypatch, tmp_path):
    config = tmp_path / "ophglm.toml"
    config.write_text('llm_backend = "openai"\nllm_base_url = "http://gpu:8000/v1"\nthreads = 3\ndevice = "cpu"\n')
    monkeypatch.setenv("OPHGLM_THREADS", "5")
    s = load_settings(config)
    assert (s.llm_backend, s.llm_base_url, s.threads) == ("openai", "http://gpu:8000/v1", 5)
    assert load_settings(config, threads=7).threads == 7


@pytest.mark.parametrize("env, message", [
    ({"OPHGLM_LLM_BACKEND": "gpt"}, "llm_backend must be one of"),
    ({"OPHGLM_LLM_BACKEND": "openai"}, "needs llm_base_url"),
    ({"OPHGLM_THREADS": "many"}, "OPHGLM_THREADS='many' is not a valid int"),
    ({"OPHGLM_DTYPE": "float8"}, "dtype must be one of"),
    ({"OPHGLM_LESION_VIEWS": "8"}, "lesion_views must be 1 to 4"),
    ({"OPHGLM_ROUTERS": "knowledge,everything"}, "routers must be among"),
    ({"OPHGLM_TOOL_TIMEOUT_S": "soon"}, "OPHGLM_TOOL_TIMEOUT_S='soon' is not a valid float"),
])
def test_bad_settings_name_the_problem(monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message):
        load_settings()


def test_unknown_key_and_missing_file_in_toml(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('llm_bakend = "local"\n')
    with pytest.raises(ValueError, match="unknown settings.*llm_bakend"):
        load_settings(config)
    with pytest.raises(ValueError, match="settings file not found"):
        load_settings(tmp_path / "missing.toml")


def test_environment_values_arrive_with_their_fields_types(monkeypatch):
    # OPHGLM_TOOL_TIMEOUT_S=30 once arrived as the string "30" and broke the turn.
    monkeypatch.setenv("OPHGLM_TOOL_TIMEOUT_S", "30")
    monkeypatch.setenv("OPHGLM_ROUTERS", "")
    s = load_settings()
    assert s.tool_timeout_s == 30.0 and isinstance(s.tool_timeout_s, float)
    assert s.router_names == ()  # no routers: the model alone decides the vessel and knowledge calls
