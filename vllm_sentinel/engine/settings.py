"""What the engine compresses: the model's contract, the server's policy, each request's choice.

- The model directory's `sentinel_config.json` gives the sentinel ids and the schedule the model
  was trained for (the default).
- `--additional-config '{"sentinel": {...}}'` is the operator's: a server-wide schedule (`sink`,
  `span`, `gap`, `window`) and the policy for clients: `min_span` (the shortest span a request may
  ask for; short spans make more steps masked ones) and `allow_request_overrides` (false: requests
  may not choose their own schedule, nor turn compression off).
- `SamplingParams(extra_args={"sentinel": {...}})` chooses per request: `{"enabled": false}` serves
  the request uncompressed, `{"span": 8, "gap": 3}` (any of sink, span, gap, window) uses another
  schedule. Over HTTP, where `vllm_xargs` takes flat values only, the same choices are the keys
  `sentinel_enabled`, `sentinel_sink`, `sentinel_span`, `sentinel_gap`, `sentinel_window`.
- `{"regions": [[a, b], ...], "output": "prompt" | "schedule"}` compresses only the marked parts of
  the prompt (semantics page, "Marked regions"); over HTTP `sentinel_regions` is one flat list
  [a, b, a, b, ...]. Regions are checked against the prompt once it is tokenized.

Every number a client sends is checked here, strictly (an integer, not a bool, a string or a
float) and against a range bounded by `max_model_len`, because it ends up in int64 arithmetic in
the scheduler and the worker: one unchecked value used to kill the engine for everyone.

The front end resolves all of it once (`EngineSettings.resolve`) and stores the result in
`vllm_config.additional_config["sentinel_resolved"]`, which reaches EngineCore and every worker
inside the pickled config; those processes only read it back (`EngineSettings.of`). The user's
own `"sentinel"` entry is never taken as resolved: it is validated every time.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import CONFIG_FILE, HOW_TO_MAKE, Regions, ScheduleConfig, SentinelConfig, SentinelConfigError, as_python
from .layout import KVLayout

KEY = "sentinel"                    # the user's options, in additional_config and SamplingParams.extra_args
RESOLVED_KEY = "sentinel_resolved"  # what the front end resolved, in additional_config
FLAT_PREFIX = "sentinel_"           # extra_args keys over HTTP: sentinel_enabled, sentinel_span, ...
SCHEDULE_FIELDS = ("sink", "span", "gap", "window")
REGION_FIELDS = ("regions", "output")  # marked regions (semantics page): which spans of the prompt
REQUEST_FIELDS = ("enabled", *SCHEDULE_FIELDS, *REGION_FIELDS)
SERVER_FIELDS = (*SCHEDULE_FIELDS, "min_span", "allow_request_overrides")
UNBOUNDED = 1 << 62  # the prompt length regions are checked against before the prompt is known
MIN_SPAN = 2  # a span of one token would be replaced by its <CR> and save nothing


class SentinelOptionError(SentinelConfigError):
    """A sentinel option that a client or operator gave is malformed or out of range."""


def _as_bool(value: Any, where: str) -> bool:
    """true/false, also as 1/0 or text: HTTP's vllm_xargs may turn JSON booleans into numbers or strings."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise SentinelOptionError(f"{where}={value!r} is not allowed: it must be true or false")


def _integer(value: Any, where: str, low: int, high: int, bounds: str) -> int:
    """`value` if it is an integer in [low, high]; otherwise an error naming key, value and range."""
    allowed = f"allowed: an integer from {low} to {high} ({bounds})"
    if isinstance(value, bool) or not isinstance(value, int):
        raise SentinelOptionError(f"{where}={value!r} is not an integer; {allowed}")
    if not low <= value <= high:
        raise SentinelOptionError(f"{where}={value} is out of range; {allowed}")
    return value


@dataclass(frozen=True)
class EngineSettings:
    cl_token_id: int
    cr_token_id: int
    schedule: ScheduleConfig  # the server's default schedule
    model_dir: str
    max_model_len: int = 1 << 20
    min_span: int = MIN_SPAN
    allow_request_overrides: bool = True

    @property
    def sentinel_ids(self) -> tuple[int, int]:
        return (self.cl_token_id, self.cr_token_id)

    # -- option checking ----------------------------------------------------------------------------
    def _ranges(self, min_span: int) -> dict[str, tuple[int, int, str]]:
        limit = self.max_model_len
        return {"sink": (0, limit, "0 to max_model_len"),
                "span": (min_span, limit, f"{'the server min_span' if min_span > MIN_SPAN else 'at least 2'} "
                                          "to max_model_len"),
                "gap": (0, limit, "0 to max_model_len"),
                "window": (0, limit, "0 to max_model_len")}

    def _schedule(self, base: ScheduleConfig, data: dict, name, min_span: int) -> ScheduleConfig:
        """`base` with the schedule fields of `data` applied, each checked; `name(field)` spells its key."""
        ranges = self._ranges(min_span)
        fields = {}
        for field in SCHEDULE_FIELDS:
            if field in data:
                low, high, bounds = ranges[field]
                fields[field] = _integer(data[field], name(field), low, high, bounds)
        schedule = ScheduleConfig(**{f: fields.get(f, getattr(base, f)) for f in SCHEDULE_FIELDS})
        if schedule.span < min_span:
            raise SentinelOptionError(
                f"span {schedule.span} is below this server's min_span {min_span}; ask for a span of at least "
                f"{min_span} (set {name('span')})")
        return schedule

    # -- front end --------------------------------------------------------------------------------
    @classmethod
    def resolve(cls, model: str, override: Any, vocab_size: int, max_model_len: int,
                tokenizer=None) -> "EngineSettings":
        """Read `sentinel_config.json` from the model directory and apply the operator's options."""
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
        override = {} if override is None else override
        where = "--additional-config sentinel"
        if not isinstance(override, dict):
            raise SentinelOptionError(f"{where} must be an object such as {{\"span\": 8, \"gap\": 2}}, got {override!r}")
        unknown = sorted(set(override) - set(SERVER_FIELDS))
        if unknown:
            raise SentinelOptionError(f"{where} has unknown field(s) {unknown}; allowed: {', '.join(SERVER_FIELDS)}")
        base = cls(config.cl_token_id, config.cr_token_id, config.schedule, str(model_dir.resolve()), max_model_len)
        min_span = MIN_SPAN
        if "min_span" in override:
            min_span = _integer(override["min_span"], f"{where}.min_span", MIN_SPAN, max_model_len,
                                "at least 2, at most max_model_len")
        allow = override.get("allow_request_overrides", True)
        if not isinstance(allow, bool):
            raise SentinelOptionError(f"{where}.allow_request_overrides={allow!r} is not allowed: it must be "
                                      "true or false")
        schedule = base._schedule(config.schedule, override, lambda f: f"{where}.{f}", min_span)
        return cls(config.cl_token_id, config.cr_token_id, schedule, str(model_dir.resolve()), max_model_len,
                   min_span, allow)

    def to_json(self) -> dict:
        return {"cl_token_id": self.cl_token_id, "cr_token_id": self.cr_token_id,
                "schedule": {name: getattr(self.schedule, name) for name in SCHEDULE_FIELDS},
                "model_dir": self.model_dir, "max_model_len": self.max_model_len,
                "min_span": self.min_span, "allow_request_overrides": self.allow_request_overrides}

    @classmethod
    def from_json(cls, data: dict) -> "EngineSettings":
        return cls(data["cl_token_id"], data["cr_token_id"], ScheduleConfig(**data["schedule"]), data["model_dir"],
                   data["max_model_len"], data["min_span"], data["allow_request_overrides"])

    # -- every process ----------------------------------------------------------------------------
    @classmethod
    def of(cls, vllm_config) -> "EngineSettings":
        data = (vllm_config.additional_config or {}).get(RESOLVED_KEY)
        if not isinstance(data, dict):
            raise RuntimeError("the sentinel engine was started without resolved settings; "
                               "start it with --attention-backend sentinel so the plugin can resolve them")
        return cls.from_json(data)

    def request_schedule(self, extra_args: dict | None) -> ScheduleConfig | None:
        """The schedule one request runs with; None when it asked for no compression.

        Raises `SentinelOptionError` naming the key, the value and the allowed range."""
        return self.request_compression(extra_args)[0]

    def request_compression(self, extra_args: dict | None,
                            prompt_len: int | None = None) -> tuple[ScheduleConfig | None, Regions | None]:
        """(schedule, marked regions or None) one request runs with; the schedule is None when it asked
        for no compression. Regions are checked against `prompt_len` when it is given.

        Raises `SentinelOptionError` naming the key, the value and the allowed range."""
        extra_args = extra_args or {}
        nested = extra_args.get(KEY)
        flat = {key[len(FLAT_PREFIX):]: value for key, value in extra_args.items()
                if isinstance(key, str) and key.startswith(FLAT_PREFIX)}
        if KEY in extra_args and flat:
            raise SentinelOptionError(f"give the sentinel options either as extra_args[{KEY!r}] = {{...}} or as "
                                      f"{FLAT_PREFIX}* keys, not both")
        if KEY not in extra_args and not flat:
            return self.schedule, None
        if KEY in extra_args:
            if not isinstance(nested, dict):
                raise SentinelOptionError(
                    f"extra_args[{KEY!r}]={nested!r} is not allowed: it must be an object such as "
                    "{\"span\": 8, \"gap\": 2} or {\"enabled\": false}")
            choice, name = nested, (lambda f: f"extra_args[{KEY!r}][{f!r}]")
        else:
            choice, name = flat, (lambda f: f"{FLAT_PREFIX}{f}")
        unknown = sorted(set(choice) - set(REQUEST_FIELDS))
        if unknown:
            raise SentinelOptionError(f"unknown sentinel option(s) {[name(f) for f in unknown]}; allowed: "
                                      f"{', '.join(name(f) for f in REQUEST_FIELDS)}")
        if not self.allow_request_overrides:
            raise SentinelOptionError(
                f"this server does not take per-request sentinel options (its operator set "
                f"allow_request_overrides to false); drop {', '.join(name(f) for f in sorted(choice))}")
        choice = dict(choice)
        if "enabled" in choice and not _as_bool(choice.pop("enabled"), name("enabled")):
            if choice:
                raise SentinelOptionError(f"a schedule makes no sense with {name('enabled')}=false; drop "
                                          f"{', '.join(name(f) for f in sorted(choice))} or enable compression")
            return None, None
        regions, output = choice.pop("regions", None), choice.pop("output", None)
        schedule = self._schedule(self.schedule, choice, name, self.min_span)
        if regions is None:
            if output is not None:
                raise SentinelOptionError(f"{name('output')} says how to treat generated tokens after marked regions; "
                                          f"give {name('regions')} too, or drop it")
            return schedule, None
        try:
            # Without the prompt (the front end, before tokenizing) only the regions' form is checked.
            parsed = Regions.parse(regions, UNBOUNDED if prompt_len is None else prompt_len,
                                   "prompt" if output is None else output)
        except SentinelConfigError as error:
            raise SentinelOptionError(f"{name('regions')}: {error}") from None
        return schedule, (None if prompt_len is None else parsed)

    def request_layout(self, sampling_params, prompt_len: int | None = None) -> KVLayout:
        extra_args = getattr(sampling_params, "extra_args", None) if sampling_params is not None else None
        return KVLayout(*self.request_compression(extra_args, prompt_len))

    def check_prompt(self, prompt_token_ids) -> None:
        """Sentinel ids may not appear in a prompt: the engine inserts them."""
        for index, token_id in enumerate(prompt_token_ids or ()):
            if token_id in self.sentinel_ids:
                name = "<CL>" if token_id == self.cl_token_id else "<CR>"
                raise SentinelOptionError(
                    f"the prompt holds the sentinel token {name} (id {token_id}) at position {index}; sentinels "
                    f"are inserted by the engine and may not appear in prompt_token_ids. Remove it (as text, "
                    f"the string {name} is served as ordinary characters)")

    def check_request(self, prompt_token_ids, sampling_params, resumable: bool = False) -> None:
        """Everything about one request that the sentinel engine cannot serve, as one clear error.

        Run by the front end (a 400 for `vllm serve`) and again by EngineCore (requests can reach it
        without the front end): a bad request must fail alone, never inside the scheduler or worker.
        """
        from vllm.sampling_params import SamplingParams

        if not isinstance(sampling_params, SamplingParams):
            raise SentinelOptionError("the sentinel engine serves generation requests only; pooling and "
                                      "embedding requests need an engine without --attention-backend sentinel")
        if resumable:
            raise SentinelOptionError(
                "streaming-input sessions (resumable requests) are not supported with --attention-backend "
                "sentinel: a session's chunks could ask for different schedules; send each input as one request")
        if prompt_token_ids is not None:
            self.check_prompt(prompt_token_ids)
        allowed = sampling_params.allowed_token_ids
        if allowed is not None and len(allowed) and set(allowed) <= set(self.sentinel_ids):
            raise SentinelOptionError(
                f"allowed_token_ids {list(allowed)} holds only sentinel ids, which the engine never samples; "
                "allow at least one ordinary token")
        self.request_compression(sampling_params.extra_args,
                                 None if prompt_token_ids is None else len(prompt_token_ids))

    @staticmethod
    def plain_regions(sampling_params) -> None:
        """Marked regions as Python lists (a copy of extra_args where they were numpy arrays, as a Ray
        Data column hands them on): arrays reach EngineCore as vLLM's array encoding, not lists."""
        extra_args = sampling_params.extra_args or {}
        options = extra_args.get(KEY)
        if isinstance(options, dict) and "regions" in options:
            sampling_params.extra_args = {**extra_args, KEY: {**options, "regions": as_python(options["regions"])}}
        elif FLAT_PREFIX + "regions" in extra_args:
            sampling_params.extra_args = {**extra_args,
                                          FLAT_PREFIX + "regions": as_python(extra_args[FLAT_PREFIX + "regions"])}

    def check_regions(self, prompt_token_ids, sampling_params) -> None:
        """A request's marked regions against its tokenized prompt (in range, sorted, disjoint)."""
        self.request_compression(getattr(sampling_params, "extra_args", None), len(prompt_token_ids))


class _NoTokenizer:
    """Stands in when the engine has no tokenizer (skip_tokenizer_init): only ids are checked."""

    def __init__(self, config: SentinelConfig):
        self._tokens = {config.cl_token_id: config.cl_token, config.cr_token_id: config.cr_token}

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return self._tokens[token_id]
