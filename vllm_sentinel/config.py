"""`sentinel_config.json`: the contract between a trained sentinel model and everything that runs it.

The schema is fixed (other tools read it)::

    {"format_version": 1,
     "cl_token": "<CL>", "cr_token": "<CR>", "cl_token_id": 4096, "cr_token_id": 4097,
     "schedule": {"sink": 4, "span": 16, "gap": 0, "window": 0}}

`schedule.window` (the recent window W of the semantics page) is optional when read: a file
without it means W = 0, so model directories written before it existed load unchanged.

Every validation error names the field and says how to fix it, because the person who sees it
is usually starting a server, not reading this file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FILE = "sentinel_config.json"
SCHEDULE_KEYS = ("sink", "span", "gap", "window")
FORMAT_VERSION = 1
HOW_TO_MAKE = (
    "make one with `vllm-sentinel train --base BASE_DIR --corpus PATH --out MODEL_DIR` "
    "(or `vllm-sentinel make-tiny --out DIR` for the offline default model)"
)


class SentinelConfigError(ValueError):
    """A sentinel config (or its model directory) is missing or does not fit the model."""


@dataclass(frozen=True)
class ScheduleConfig:
    """Which real tokens get compressed: `sink` never, then spans of `span` with `gap` between.

    `window` W: a closed span stays visible raw to the next W real tokens after its last one and is
    seen through its `<CR>` only after that (W = 0: the paper's rule).
    """

    sink: int = 4
    span: int = 16
    gap: int = 0
    window: int = 0

    def __post_init__(self) -> None:
        for name in SCHEDULE_KEYS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SentinelConfigError(
                    f"schedule.{name} must be an integer, got {value!r}")
        if self.span < 2:
            raise SentinelConfigError(
                f"schedule.span must be >= 2 (a span of {self.span} token(s) would replace itself "
                "by a <CR> and save nothing); set span to 2 or more")
        if self.sink < 0:
            raise SentinelConfigError(f"schedule.sink must be >= 0, got {self.sink}; use 0 for no sink")
        if self.gap < 0:
            raise SentinelConfigError(
                f"schedule.gap must be >= 0, got {self.gap}; use 0 for back-to-back spans")
        if self.window < 0:
            raise SentinelConfigError(
                f"schedule.window must be >= 0, got {self.window}; use 0 for the paper's rule (no recent window)")

    @property
    def net_ratio(self) -> float:
        """Steady-state fraction of real tokens whose KV is dropped: (L - 1) / (L + G)."""
        return (self.span - 1) / (self.span + self.gap)

    def ideal_kv_slots(self, num_tokens: int) -> float:
        """Steady-state physical KV length for `num_tokens` real tokens (semantics page):
        S + (n - S - W)(G + 1)/(L + G) + W + L. Until n passes S + W nothing has been compacted,
        so the count is n itself (and never more than n)."""
        if num_tokens <= self.sink + self.window:
            return float(num_tokens)
        tail = num_tokens - self.sink - self.window
        ideal = self.sink + tail * (self.gap + 1) / (self.span + self.gap) + self.window + self.span
        return min(float(num_tokens), ideal)

    @classmethod
    def from_dict(cls, data: Any, where: str = "schedule") -> "ScheduleConfig":
        if not isinstance(data, dict):
            raise SentinelConfigError(
                f"{where} must be an object like {{\"sink\": 4, \"span\": 16, \"gap\": 0, \"window\": 0}}, "
                f"got {data!r}")
        unknown = set(data) - set(SCHEDULE_KEYS)
        if unknown:
            raise SentinelConfigError(
                f"{where} has unknown field(s) {sorted(unknown)}; allowed: {', '.join(SCHEDULE_KEYS)}")
        return cls(**data)  # a missing "window" is 0: files written before it existed load unchanged

    def to_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in SCHEDULE_KEYS}


OUTPUT_MODES = ("prompt", "schedule")


def as_python(value):
    """Lists and ints from numpy arrays and scalars, nested; anything else unchanged."""
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [as_python(v) for v in value]
    return value


@dataclass(frozen=True)
class Regions:
    """The parts of one request's prompt to compress (semantics page, "Marked regions").

    `ranges`: sorted, non-overlapping half-open [a, b) of real-token offsets, 0 <= a < b <= prompt
    length; inside each, spans of the schedule's L tokens separated by its G raw ones, from a, a
    remainder shorter than L left raw. The sink does not apply; nothing outside them is compressed.
    `output`: "prompt" leaves generated tokens raw; "schedule" compresses them too, in spans of L
    separated by G from the first generated token."""

    ranges: tuple[tuple[int, int], ...]
    prompt_len: int
    output: str = "prompt"

    def __post_init__(self) -> None:
        if self.output not in OUTPUT_MODES:
            raise SentinelConfigError(f"output={self.output!r} is not allowed: it must be one of {list(OUTPUT_MODES)}")
        previous_end = 0
        for i, pair in enumerate(self.ranges):
            a, b = pair
            if not 0 <= a < b <= self.prompt_len:
                raise SentinelConfigError(
                    f"region {i} [{a}, {b}) is out of range: regions need 0 <= start < end <= {self.prompt_len}, "
                    "the prompt's length in tokens")
            if a < previous_end:
                raise SentinelConfigError(
                    f"region {i} [{a}, {b}) starts before region {i - 1} ends ({previous_end}): regions must be "
                    "sorted and must not overlap")
            previous_end = b

    @classmethod
    def parse(cls, value: Any, prompt_len: int, output: str = "prompt") -> "Regions":
        """From [[a, b], ...] (or the flat [a, b, a, b, ...] HTTP's vllm_xargs can carry), each an integer.
        Numpy arrays count as lists: a Ray Data batch hands every list column back as arrays."""
        value = as_python(value)
        if not isinstance(value, (list, tuple)):
            raise SentinelConfigError(f"regions={value!r} is not a list of [start, end] pairs")
        flat = len(value) > 0 and all(not isinstance(v, (list, tuple)) for v in value)
        if flat:
            if len(value) % 2:
                raise SentinelConfigError(f"regions={list(value)!r} as a flat list needs an even number of offsets "
                                          "(start, end, start, end, ...)")
            value = [value[i: i + 2] for i in range(0, len(value), 2)]
        pairs = []
        for i, pair in enumerate(value):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2 or any(
                    isinstance(x, bool) or not isinstance(x, int) for x in pair):
                raise SentinelConfigError(f"region {i} {pair!r} is not a pair of integers [start, end]")
            pairs.append((pair[0], pair[1]))
        return cls(tuple(pairs), prompt_len, output)

    def span_starts(self, schedule: ScheduleConfig) -> list[int]:
        """Where the prompt's spans start: in each region, every L + G tokens while a whole span fits."""
        period = schedule.span + schedule.gap
        return [start for a, b in self.ranges for start in range(a, b - schedule.span + 1, period)]

    def to_dict(self) -> dict[str, Any]:
        return {"ranges": [list(r) for r in self.ranges], "prompt_len": self.prompt_len, "output": self.output}


@dataclass(frozen=True)
class SentinelConfig:
    cl_token: str = "<CL>"
    cr_token: str = "<CR>"
    cl_token_id: int = 4096
    cr_token_id: int = 4097
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise SentinelConfigError(
                f"format_version {self.format_version!r} is not supported by this vllm-sentinel "
                f"(it reads version {FORMAT_VERSION}); upgrade vllm-sentinel or re-export the model")
        for name in ("cl_token_id", "cr_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SentinelConfigError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("cl_token", "cr_token"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise SentinelConfigError(f"{name} must be a non-empty string")
        if self.cl_token_id == self.cr_token_id:
            raise SentinelConfigError(
                f"cl_token_id and cr_token_id are both {self.cl_token_id}; they must be two different tokens")
        if self.cl_token == self.cr_token:
            raise SentinelConfigError(f"cl_token and cr_token are both {self.cl_token!r}; use two strings")
        if not isinstance(self.schedule, ScheduleConfig):
            raise SentinelConfigError("schedule must be a ScheduleConfig")

    @property
    def sentinel_ids(self) -> tuple[int, int]:
        return (self.cl_token_id, self.cr_token_id)

    def with_schedule(self, schedule: ScheduleConfig) -> "SentinelConfig":
        return SentinelConfig(self.cl_token, self.cr_token, self.cl_token_id, self.cr_token_id,
                              schedule, self.format_version)

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format_version": self.format_version,
                "cl_token": self.cl_token, "cr_token": self.cr_token,
                "cl_token_id": self.cl_token_id, "cr_token_id": self.cr_token_id,
                "schedule": self.schedule.to_dict()}

    @classmethod
    def from_dict(cls, data: Any) -> "SentinelConfig":
        if not isinstance(data, dict):
            raise SentinelConfigError(f"{CONFIG_FILE} must hold a JSON object, got {type(data).__name__}")
        required = ("format_version", "cl_token", "cr_token", "cl_token_id", "cr_token_id", "schedule")
        missing = [name for name in required if name not in data]
        if missing:
            raise SentinelConfigError(
                f"{CONFIG_FILE} is missing field(s) {missing}; expected all of {list(required)}")
        unknown = set(data) - set(required)
        if unknown:
            raise SentinelConfigError(f"{CONFIG_FILE} has unknown field(s) {sorted(unknown)}")
        fields = {k: data[k] for k in required if k != "schedule"}
        return cls(schedule=ScheduleConfig.from_dict(data["schedule"]), **fields)

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, model_dir: str | Path) -> "SentinelConfig":
        model_dir = Path(model_dir)
        path = model_dir / CONFIG_FILE
        if not path.is_file():
            raise SentinelConfigError(
                f"{path} not found: {model_dir} is not a sentinel model; {HOW_TO_MAKE}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SentinelConfigError(f"{path} is not valid JSON ({err}); fix or regenerate it") from err
        try:
            return cls.from_dict(data)
        except SentinelConfigError as err:
            raise SentinelConfigError(f"{path}: {err}") from None

    # -- fit to a model ------------------------------------------------------------------------
    def validate_for(self, tokenizer: Any, vocab_size: int | None = None) -> None:
        """Check that the ids exist in the model and that the tokenizer agrees on their strings."""
        size = vocab_size if vocab_size is not None else len(tokenizer)
        for name in ("cl_token_id", "cr_token_id"):
            if getattr(self, name) >= size:
                raise SentinelConfigError(
                    f"{name}={getattr(self, name)} is outside the model's vocabulary (size {size}); "
                    "the sentinel tokens were not added to this model - retrain it with `vllm-sentinel train`")
        for token_name, id_name in (("cl_token", "cl_token_id"), ("cr_token", "cr_token_id")):
            token, token_id = getattr(self, token_name), getattr(self, id_name)
            actual = tokenizer.convert_ids_to_tokens(token_id)
            if actual != token:
                raise SentinelConfigError(
                    f"{id_name}={token_id} is {actual!r} in the tokenizer, but {token_name} says {token!r}; "
                    f"point {id_name} at the id of {token!r} (tokenizer.convert_tokens_to_ids) or retrain")
