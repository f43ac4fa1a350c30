import json

import pytest
from transformers import PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers

from vllm_sentinel.config import CONFIG_FILE, ScheduleConfig, SentinelConfig, SentinelConfigError

SCHEMA_EXAMPLE = {"format_version": 1, "cl_token": "<CL>", "cr_token": "<CR>",
                  "cl_token_id": 4096, "cr_token_id": 4097,
                  "schedule": {"sink": 4, "span": 16, "gap": 0}}


def test_schema_round_trip(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps(SCHEMA_EXAMPLE))
    config = SentinelConfig.load(tmp_path)
    assert config.schedule == ScheduleConfig(4, 16, 0)
    assert config.sentinel_ids == (4096, 4097)
    (tmp_path / "copy").mkdir()
    config.save(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / CONFIG_FILE).read_text()) == SCHEMA_EXAMPLE


def test_missing_file_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(SentinelConfigError, match=CONFIG_FILE) as err:
        SentinelConfig.load(tmp_path)
    assert "vllm-sentinel train" in str(err.value)


@pytest.mark.parametrize("change, field", [
    ({"schedule": {"sink": 4, "span": 1, "gap": 0}}, "schedule.span"),
    ({"schedule": {"sink": -1, "span": 16, "gap": 0}}, "schedule.sink"),
    ({"schedule": {"sink": 4, "span": 16, "gap": -2}}, "schedule.gap"),
    ({"schedule": {"sink": 4, "span": 16, "gap": 0, "stride": 3}}, "stride"),
    ({"format_version": 2}, "format_version"),
    ({"cl_token_id": 4097}, "cl_token_id and cr_token_id"),
    ({"cr_token_id": "x"}, "cr_token_id"),
])
def test_invalid_fields_are_named(tmp_path, change, field):
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**SCHEMA_EXAMPLE, **change}))
    with pytest.raises(SentinelConfigError, match=field.replace(".", r"\.")):
        SentinelConfig.load(tmp_path)


def test_missing_field_and_bad_json(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps({k: v for k, v in SCHEMA_EXAMPLE.items() if k != "schedule"}))
    with pytest.raises(SentinelConfigError, match="missing field.*schedule"):
        SentinelConfig.load(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(SentinelConfigError, match="not valid JSON"):
        SentinelConfig.load(tmp_path)


@pytest.fixture(scope="module")
def word_tokenizer():
    vocab = {w: i for i, w in enumerate(["<unk>", "a", "b", "<CL>", "<CR>"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")


def test_validate_against_tokenizer(word_tokenizer):
    SentinelConfig(cl_token_id=3, cr_token_id=4).validate_for(word_tokenizer)
    with pytest.raises(SentinelConfigError, match="cr_token_id=9 is outside the model's vocabulary"):
        SentinelConfig(cl_token_id=3, cr_token_id=9).validate_for(word_tokenizer)
    with pytest.raises(SentinelConfigError, match="cl_token_id=1 is 'a' in the tokenizer"):
        SentinelConfig(cl_token_id=1, cr_token_id=4).validate_for(word_tokenizer)


def test_ideal_kv_slots_and_ratio():
    s = ScheduleConfig(sink=4, span=16, gap=0)
    assert s.net_ratio == pytest.approx(15 / 16)
    assert s.ideal_kv_slots(3) == 3
    assert s.ideal_kv_slots(4 + 160) == pytest.approx(4 + 10 + 16)
