"""What the engine compresses: the model's contract, the server's default, each request's choice.

- The model directory's `sentinel_config.json` gives the sentinel ids and the schedule the model
  was trained for (the default).
- `--additional-config '{"sentinel": {"span": 8, "gap": 2}}'` overrides the schedule server-wide.
- `SamplingParams(extra_args={"sentinel": {...}})` chooses per request:
  `{"enabled": false}` serves the request uncompressed, `{"span": 8, "gap": 3}` (any of sink,
  span, gap) uses another schedule. Over HTTP, where `vllm_xargs` takes flat values only, the same
  choices are the keys `sentinel_enabled`, `sentinel_sink`, `sentinel_span`, `sentinel_gap`.

The front end resolves all of it once (`EngineSettings.resolve`) and stores the result in
`vllm_config.additional_config["sentinel"]`, which reaches EngineCore and every worker inside the
pickled config; those processes only read it back (`EngineSettings.of`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import CONFIG_FILE, HOW_TO_MAKE, ScheduleConfig, SentinelConfig, SentinelConfigError
from .layout import KVLayout

KEY = "sentinel"  # in additional_config and in SamplingParams.extra_args
FLAT_PREFIX = "sentinel_"  # extra_args keys over HTTP: sentinel_enabled, sentinel_span, ...
SCHEDULE_FIELDS = ("sink", "span", "gap")


def _as_bool(value: Any, where: str) -> bool:
    """true/false, also as 1/0 or text: HTTP's vllm_xargs turns JSON booleans into numbers or strings."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise SentinelConfigError(f"{where} must be true or false, got {value!r}")


def _schedule_override(base: ScheduleConfig, data: Any, where: str, allowed: tuple[str, ...]) -> dict:
    if not isinstance(data, dict):
        raise SentinelConfigError(
            f"{where} must be an object such as {{\"span\": 8, \"gap\": 2}}, got {data!r}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise SentinelConfigError(f"{where} has unknown field(s) {unknown}; allowed: {', '.join(allowed)}")
    fields = {name: data.get(name, getattr(base, name)) for name in SCHEDULE_FIELDS}
    try:
        ScheduleConfig(**fields)
    except SentinelConfigError as err:
        raise SentinelConfigError(f"{where}: {err}") from None
    return fields


@dataclass(frozen=True)
class EngineSettings:
    cl_token_id: int
    cr_token_id: int
    schedule: ScheduleConfig  # the server's default schedule
    model_dir: str

    @property
    def sentinel_ids(self) -> tuple[int, int]:
        return (self.cl_token_id, self.cr_token_id)

    # -- front end --------------------------------------------------------------------------------
    @classmethod
    def resolve(cls, model: str, override: Any, vocab_size: int, tokenizer=None) -> "EngineSettings":
        """Read `sentinel_config.json` from the model directory and apply the server override."""
        model_dir = Path(model)
        if not model_dir.is_dir():
            raise SentinelConfigError(
                f"--attention-backend sentinel needs a local model directory holding {CONFIG_FILE}; "
                f"{model!r} is not a directory. Pass the path of a sentinel model ({HOW_TO_MAKE})")
        config = SentinelConfig.load(model_dir)
        if tokenizer is not None:
            config.validate_for(tokenizer, vocab_size)
        else:
            config.validate_for(_NoTokenizer(config), vocab_size)
        schedule = config.schedule
        if override is not None:
            where = "--additional-config sentinel"
            schedule = ScheduleConfig(**_schedule_override(schedule, override, where, SCHEDULE_FIELDS))
        return cls(config.cl_token_id, config.cr_token_id, schedule, str(model_dir.resolve()))

    def to_json(self) -> dict:
        return {"cl_token_id": self.cl_token_id, "cr_token_id": self.cr_token_id,
                "schedule": {name: getattr(self.schedule, name) for name in SCHEDULE_FIELDS},
                "model_dir": self.model_dir}

    @classmethod
    def from_json(cls, data: dict) -> "EngineSettings":
        return cls(data["cl_token_id"], data["cr_token_id"], ScheduleConfig(**data["schedule"]), data["model_dir"])

    @staticmethod
    def is_resolved(data: Any) -> bool:
        return isinstance(data, dict) and "cl_token_id" in data

    # -- every process ----------------------------------------------------------------------------
    @classmethod
    def of(cls, vllm_config) -> "EngineSettings":
        data = (vllm_config.additional_config or {}).get(KEY)
        if not cls.is_resolved(data):
            raise RuntimeError("the sentinel engine was started without resolved settings; "
                               "start it with --attention-backend sentinel so the plugin can resolve them")
        return cls.from_json(data)

    def request_schedule(self, extra_args: dict | None) -> ScheduleConfig | None:
        """The schedule one request runs with; None when it asked for no compression."""
        extra_args = extra_args or {}
        nested = extra_args.get(KEY)
        flat = {key[len(FLAT_PREFIX):]: value for key, value in extra_args.items() if key.startswith(FLAT_PREFIX)}
        if nested is not None and flat:
            raise SentinelConfigError(f"give the sentinel options either as extra_args[{KEY!r}] = {{...}} or as "
                                      f"{FLAT_PREFIX}* keys, not both")
        if nested is None and not flat:
            return self.schedule
        choice, where = (nested, f"extra_args[{KEY!r}]") if nested is not None else (flat, f"{FLAT_PREFIX}* options")
        if isinstance(choice, dict) and "enabled" in choice:
            choice = dict(choice)
            if not _as_bool(choice.pop("enabled"), f"{where}: enabled"):
                if choice:
                    raise SentinelConfigError(f"{where}: a schedule makes no sense with enabled=false; drop "
                                              f"{sorted(choice)} or enable compression")
                return None
        fields = _schedule_override(self.schedule, choice, where, SCHEDULE_FIELDS)
        return ScheduleConfig(**fields)

    def request_layout(self, sampling_params) -> KVLayout:
        extra_args = getattr(sampling_params, "extra_args", None) if sampling_params is not None else None
        return KVLayout(self.request_schedule(extra_args))


class _NoTokenizer:
    """Stands in when the engine has no tokenizer (skip_tokenizer_init): only ids are checked."""

    def __init__(self, config: SentinelConfig):
        self._tokens = {config.cl_token_id: config.cl_token, config.cr_token_id: config.cr_token}

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return self._tokens[token_id]
