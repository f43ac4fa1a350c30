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
    # A file without "window" (every model dir written before it existed) means W = 0; saving writes it.
    assert config.schedule.window == 0
    written = json.loads((tmp_path / "copy" / CONFIG_FILE).read_text())
    assert written == {**SCHEMA_EXAMPLE, "schedule": {**SCHEMA_EXAMPLE["schedule"], "window": 0}}


def test_window_round_trips_and_keeps_positional_order(tmp_path):
    data = {**SCHEMA_EXAMPLE, "schedule": {"sink": 4, "span": 16, "gap": 2, "window": 24}}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(data))
    config = SentinelConfig.load(tmp_path)
    assert config.schedule == ScheduleConfig(4, 16, 2, 24) == ScheduleConfig(sink=4, span=16, gap=2, window=24)
    assert config.schedule != ScheduleConfig(4, 16, 2)
    config.save(tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text()) == data
    assert ScheduleConfig(4, 16, 0).window == 0 and ScheduleConfig(4, 16, 0, 3).window == 3
    assert ScheduleConfig(4, 16, 2, 24).to_dict() == {"sink": 4, "span": 16, "gap": 2, "window": 24}


@pytest.mark.parametrize("window", [-1, True, 2.5, "3", None])
def test_bad_window_is_named(tmp_path, window):
    with pytest.raises(SentinelConfigError, match=r"schedule\.window"):
        ScheduleConfig(4, 16, 0, window)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**SCHEMA_EXAMPLE,
                                                    "schedule": {"sink": 4, "span": 16, "gap": 0, "window": window}}))
    with pytest.raises(SentinelConfigError, match=r"schedule\.window"):
        SentinelConfig.load(tmp_path)


def test_missing_file_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(SentinelConfigError, match=CONFIG_FILE) as err:
        SentinelConfig.load(tmp_path)
    assert "vllm-sentinel train" in str(err.value)


@pytest.mark.parametrize("change, field", [
    ({"schedule": {"sink": 4, "span": 1, "gap": 0}}, "schedule.span"),
    ({"schedule": {"sink": -1, "span": 16, "gap": 0}}, "schedule.sink"),
    ({"schedule": {"sink": 4, "span": 16, "gap": -2}}, "schedule.gap"),
    ({"schedule": {"sink": 4, "span": 16, "gap": 0, "stride": 3}}, "stride"),
    ({"schedule": {"sink": 4, "span": 16, "gap": 0, "window": -3}}, "schedule.window"),
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
    # With a recent window W: S + (n - S - W)(G + 1)/(L + G) + W + L, and never more than n.
    w = ScheduleConfig(sink=4, span=16, gap=0, window=32)
    assert w.ideal_kv_slots(4 + 32 + 160) == pytest.approx(4 + 10 + 32 + 16)
    assert w.ideal_kv_slots(30) == 30 and w.ideal_kv_slots(36) == 36 and w.ideal_kv_slots(40) == 40
    g = ScheduleConfig(sink=2, span=8, gap=3, window=5)
    assert g.ideal_kv_slots(2 + 5 + 1100) == pytest.approx(2 + 1100 * 4 / 11 + 5 + 8)
    for schedule in (s, w, g):
        assert all(schedule.ideal_kv_slots(n) <= n for n in range(200))
