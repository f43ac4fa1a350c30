"""The engine's sentinel settings: the model's contract, the server override, each request's choice.

The second half starts `LLM(...)` with bad set-ups: they fail while vLLM builds its config, in this
process, before any engine starts, with a message naming the problem and the fix.
"""
import json
import shutil

import pytest

from vllm_sentinel.config import ScheduleConfig, SentinelConfigError
from vllm_sentinel.engine.settings import EngineSettings

DEFAULT = ScheduleConfig(4, 16, 0)


@pytest.fixture
def settings():
    return EngineSettings(4096, 4097, DEFAULT, "/models/x")


@pytest.mark.parametrize("extra, expected", [
    (None, DEFAULT),
    ({}, DEFAULT),
    ({"unrelated": 1}, DEFAULT),
    ({"sentinel": {"span": 8, "gap": 3}}, ScheduleConfig(4, 8, 3)),
    ({"sentinel": {"sink": 0}}, ScheduleConfig(0, 16, 0)),
    ({"sentinel": {"enabled": True, "span": 4}}, ScheduleConfig(4, 4, 0)),
    ({"sentinel": {"enabled": False}}, None),
    ({"sentinel_span": 8, "sentinel_gap": 2}, ScheduleConfig(4, 8, 2)),
    ({"sentinel_enabled": 0}, None),          # JSON false, as vllm_xargs may hand it over
    ({"sentinel_enabled": "false"}, None),
    ({"sentinel_enabled": "true"}, DEFAULT),
])
def test_each_request_chooses_its_schedule(settings, extra, expected):
    assert settings.request_schedule(extra) == expected


def test_request_layouts_follow_the_choice(settings):
    class Params:
        extra_args = {"sentinel": {"enabled": False}}

    assert not settings.request_layout(Params()).compresses
    assert settings.request_layout(None).schedule == DEFAULT


def test_settings_survive_the_trip_through_additional_config(settings):
    data = json.loads(json.dumps(settings.to_json()))
    assert EngineSettings.is_resolved(data) and EngineSettings.from_json(data) == settings


def write_model(tmp_path, sentinel_model_dir, config_text=None):
    for path in sentinel_model_dir.iterdir():
        if path.name != "sentinel_config.json":
            shutil.copy(path, tmp_path / path.name)
    if config_text is not None:
        (tmp_path / "sentinel_config.json").write_text(config_text)
    return tmp_path


def test_resolve_reads_the_model_and_applies_the_override(sentinel_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sentinel_model_dir)
    resolved = EngineSettings.resolve(str(sentinel_model_dir), {"span": 8}, 4098, tokenizer)
    assert resolved.sentinel_ids == (4096, 4097) and resolved.schedule == ScheduleConfig(4, 8, 0)
    with pytest.raises(SentinelConfigError, match=r"--additional-config sentinel has unknown field\(s\) \['spam'\]"):
        EngineSettings.resolve(str(sentinel_model_dir), {"spam": 8}, 4098, tokenizer)
    with pytest.raises(SentinelConfigError, match="is not a directory"):
        EngineSettings.resolve("some-hub/model", None, 4098)


def test_ids_the_model_does_not_have_are_refused(sentinel_model_dir, tmp_path):
    config = json.loads((sentinel_model_dir / "sentinel_config.json").read_text())
    config.update(cl_token_id=5000, cr_token_id=5001)
    model = write_model(tmp_path, sentinel_model_dir, json.dumps(config))
    with pytest.raises(SentinelConfigError, match="outside the model's vocabulary"):
        EngineSettings.resolve(str(model), None, 4098)


# -- LLM(...) start-up failures -----------------------------------------------------------------------

def start(model_dir, **kwargs):
    from engine_helpers import make_llm

    return make_llm(model_dir, **kwargs)


@pytest.mark.parametrize("config_text, message", [
    (None, r"sentinel_config.json not found: .* make one with `vllm-sentinel train"),
    ("{not json", r"sentinel_config.json is not valid JSON"),
    ('{"format_version": 1}', r"sentinel_config.json: .*missing field\(s\)"),
])
def test_a_missing_or_malformed_config_names_the_file_and_the_fix(sentinel_model_dir, tmp_path, config_text, message):
    model = write_model(tmp_path, sentinel_model_dir, config_text)
    with pytest.raises(Exception, match=message) as error:
        start(model)
    assert str(model) in str(error.value)


@pytest.mark.parametrize("options, message", [
    (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}),
     "speculative decoding"),
    (dict(enable_lora=True), "LoRA adapters"),
    (dict(kv_cache_dtype="fp8"), "--kv-cache-dtype fp8"),
    (dict(scheduler_cls="vllm.v1.core.sched.scheduler.Scheduler"), "a custom --scheduler-cls"),
])
def test_options_the_engine_cannot_honour_are_refused(sentinel_model_dir, options, message):
    with pytest.raises(Exception, match=f"--attention-backend sentinel cannot be combined with .*{message}"):
        start(sentinel_model_dir, **options)
