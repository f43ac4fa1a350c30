"""The engine's sentinel settings: the model's contract, the server override, each request's choice.

The second half starts `LLM(...)` with bad set-ups: they fail while vLLM builds its config, in this
process, before any engine starts, with a message naming the problem and the fix.
"""
import json
import shutil

import pytest

from vllm_sentinel.config import ScheduleConfig, SentinelConfigError
from vllm_sentinel.engine.settings import EngineSettings, SentinelOptionError

DEFAULT = ScheduleConfig(4, 16, 0)
MAX_MODEL_LEN = 1024


@pytest.fixture
def settings():
    return EngineSettings(4096, 4097, DEFAULT, "/models/x", MAX_MODEL_LEN)


@pytest.mark.parametrize("extra, expected", [
    (None, DEFAULT),
    ({}, DEFAULT),
    ({"unrelated": 1}, DEFAULT),
    ({"sentinel": {"span": 8, "gap": 3}}, ScheduleConfig(4, 8, 3)),
    ({"sentinel": {"sink": 0}}, ScheduleConfig(0, 16, 0)),
    ({"sentinel": {"enabled": True, "span": 4}}, ScheduleConfig(4, 4, 0)),
    ({"sentinel": {"enabled": False}}, None),
    ({"sentinel": {"window": 0}}, DEFAULT),
    ({"sentinel": {"window": 64}}, ScheduleConfig(4, 16, 0, 64)),
    ({"sentinel_window": 7, "sentinel_span": 8}, ScheduleConfig(4, 8, 0, 7)),
    ({"sentinel_span": 8, "sentinel_gap": 2}, ScheduleConfig(4, 8, 2)),
    ({"sentinel_span": MAX_MODEL_LEN, "sentinel_gap": MAX_MODEL_LEN}, ScheduleConfig(4, MAX_MODEL_LEN, MAX_MODEL_LEN)),
    ({"sentinel_enabled": 0}, None),          # JSON false, as vllm_xargs may hand it over
    ({"sentinel_enabled": "false"}, None),
    ({"sentinel_enabled": "true"}, DEFAULT),
])
def test_each_request_chooses_its_schedule(settings, extra, expected):
    assert settings.request_schedule(extra) == expected


# Each bad value is refused with the key, the value and the allowed range in the message: values
# like 2**63 used to reach the worker's int64 arithmetic and kill the engine.
@pytest.mark.parametrize("extra, message", [
    ({"sentinel_span": 2 ** 63}, r"sentinel_span=9223372036854775808 is out of range; allowed: an integer from 2 to 1024"),
    ({"sentinel_span": 2 ** 62, "sentinel_gap": 2 ** 62}, r"sentinel_span=4611686018427387904 is out of range"),
    ({"sentinel_gap": 2 ** 62}, r"sentinel_gap=4611686018427387904 is out of range; allowed: an integer from 0 to 1024"),
    ({"sentinel_sink": -1}, r"sentinel_sink=-1 is out of range; allowed: an integer from 0 to 1024"),
    ({"sentinel_span": "8"}, r"sentinel_span='8' is not an integer; allowed: an integer from 2 to 1024"),
    ({"sentinel_span": 8.5}, r"sentinel_span=8.5 is not an integer"),
    ({"sentinel_span": 8.0}, r"sentinel_span=8.0 is not an integer"),
    ({"sentinel_span": True}, r"sentinel_span=True is not an integer"),
    ({"sentinel_span": None}, r"sentinel_span=None is not an integer"),
    ({"sentinel_span": 1}, r"sentinel_span=1 is out of range; allowed: an integer from 2 to 1024"),
    ({"sentinel_window": 2 ** 63}, r"sentinel_window=9223372036854775808 is out of range"),
    ({"sentinel_window": -1}, r"sentinel_window=-1 is out of range; allowed: an integer from 0 to 1024"),
    ({"sentinel_spam": 3}, r"unknown sentinel option\(s\) \['sentinel_spam'\]; allowed: sentinel_enabled"),
    ({"sentinel": {"spam": 3}}, r"unknown sentinel option\(s\) \[\"extra_args\['sentinel'\]\['spam'\]\"\]"),
    ({"sentinel": {"span": 2 ** 63}}, r"extra_args\['sentinel'\]\['span'\]=9223372036854775808 is out of range"),
    ({"sentinel": None}, r"extra_args\['sentinel'\]=None is not allowed"),
    ({"sentinel": 8}, r"extra_args\['sentinel'\]=8 is not allowed"),
    ({"sentinel_enabled": "maybe"}, r"sentinel_enabled='maybe' is not allowed: it must be true or false"),
    ({"sentinel_enabled": 2}, r"sentinel_enabled=2 is not allowed"),
    ({"sentinel_enabled": False, "sentinel_span": 8}, r"a schedule makes no sense with sentinel_enabled=false"),
    ({"sentinel": {"span": 8}, "sentinel_gap": 2}, r"not both"),
])
def test_bad_request_options_name_the_key_the_value_and_the_range(settings, extra, message):
    with pytest.raises(SentinelOptionError, match=message):
        settings.request_schedule(extra)


def test_the_operator_sets_a_minimum_span_and_can_forbid_overrides(sentinel_model_dir):
    strict = EngineSettings.resolve(str(sentinel_model_dir), {"min_span": 8}, 4098, MAX_MODEL_LEN)
    assert strict.request_schedule({"sentinel_span": 8}) == ScheduleConfig(4, 8, 0)
    with pytest.raises(SentinelOptionError, match=r"sentinel_span=4 is out of range; allowed: an integer from 8 "
                                                  r"to 1024 \(the server min_span to max_model_len\)"):
        strict.request_schedule({"sentinel_span": 4})
    assert strict.request_schedule({"sentinel_enabled": False}) is None

    closed = EngineSettings.resolve(str(sentinel_model_dir), {"allow_request_overrides": False, "span": 8},
                                    4098, MAX_MODEL_LEN)
    assert closed.request_schedule(None) == ScheduleConfig(4, 8, 0)
    for extra in ({"sentinel_span": 16}, {"sentinel_enabled": False}, {"sentinel": {}}):
        with pytest.raises(SentinelOptionError, match="does not take per-request sentinel options"):
            closed.request_schedule(extra)

    with pytest.raises(SentinelOptionError, match=r"sentinel.span=4 is out of range; allowed: an integer from 8"):
        EngineSettings.resolve(str(sentinel_model_dir), {"min_span": 8, "span": 4}, 4098, MAX_MODEL_LEN)
    with pytest.raises(SentinelOptionError, match=r"span 16 is below this server's min_span 32"):
        EngineSettings.resolve(str(sentinel_model_dir), {"min_span": 32}, 4098, MAX_MODEL_LEN)  # the model's span
    for bad, message in [({"min_span": 1}, r"min_span=1 is out of range"),
                         ({"allow_request_overrides": "no"}, r"allow_request_overrides='no' is not allowed"),
                         ({"span": 2 ** 63}, r"--additional-config sentinel.span=9223372036854775808 is out of range"),
                         ({"cl_token_id": 5}, r"unknown field\(s\) \['cl_token_id'\]")]:
        with pytest.raises(SentinelOptionError, match=message):
            EngineSettings.resolve(str(sentinel_model_dir), bad, 4098, MAX_MODEL_LEN)


def test_requests_the_engine_cannot_serve_are_refused_whole(settings):
    from vllm import PoolingParams, SamplingParams

    settings.check_request([1, 2, 3], SamplingParams(allowed_token_ids=[4096, 7]))
    with pytest.raises(SentinelOptionError, match=r"sentinel token <CR> \(id 4097\) at position 1"):
        settings.check_request([1, 4097], SamplingParams())
    with pytest.raises(SentinelOptionError, match="allowed_token_ids \\[4096, 4097\\] holds only sentinel ids"):
        settings.check_request([1], SamplingParams(allowed_token_ids=[4096, 4097]))
    with pytest.raises(SentinelOptionError, match="streaming-input sessions"):
        settings.check_request([1], SamplingParams(), resumable=True)
    with pytest.raises(SentinelOptionError, match="generation requests only"):
        settings.check_request([1], PoolingParams())
    with pytest.raises(SentinelOptionError, match="out of range"):
        settings.check_request([1], SamplingParams(extra_args={"sentinel_span": 2 ** 63}))


def test_request_layouts_follow_the_choice(settings):
    class Params:
        extra_args = {"sentinel": {"enabled": False}}

    assert not settings.request_layout(Params()).compresses
    assert settings.request_layout(None).schedule == DEFAULT


def test_settings_survive_the_trip_through_additional_config(settings):
    data = json.loads(json.dumps(settings.to_json()))
    assert EngineSettings.from_json(data) == settings


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
    resolved = EngineSettings.resolve(str(sentinel_model_dir), {"span": 8}, 4098, MAX_MODEL_LEN, tokenizer)
    assert resolved.sentinel_ids == (4096, 4097) and resolved.schedule == ScheduleConfig(4, 8, 0)
    with pytest.raises(SentinelConfigError, match=r"--additional-config sentinel has unknown field\(s\) \['spam'\]"):
        EngineSettings.resolve(str(sentinel_model_dir), {"spam": 8}, 4098, MAX_MODEL_LEN, tokenizer)
    with pytest.raises(SentinelConfigError, match="is not a directory"):
        EngineSettings.resolve("some-hub/model", None, 4098, MAX_MODEL_LEN)


def test_ids_the_model_does_not_have_are_refused(sentinel_model_dir, tmp_path):
    config = json.loads((sentinel_model_dir / "sentinel_config.json").read_text())
    config.update(cl_token_id=5000, cr_token_id=5001)
    model = write_model(tmp_path, sentinel_model_dir, json.dumps(config))
    with pytest.raises(SentinelConfigError, match="outside the model's vocabulary"):
        EngineSettings.resolve(str(model), None, 4098, MAX_MODEL_LEN)


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
    (dict(runner="pooling"), "the pooling runner"),
    (dict(additional_config={"sentinel": {"cl_token_id": 5, "cr_token_id": 6}}), None),
])
def test_options_the_engine_cannot_honour_are_refused(sentinel_model_dir, options, message):
    expected = (f"--attention-backend sentinel cannot be combined with .*{message}" if message else
                r"--additional-config sentinel has unknown field\(s\) \['cl_token_id', 'cr_token_id'\]")
    with pytest.raises(Exception, match=expected):
        start(sentinel_model_dir, **options)
