"""What a person sees: our result lines on the terminal, vLLM's own log in a file.

vLLM logs pages of INFO lines per engine (and torch's C++ layer adds NUMA warnings). Our commands
and the main example route vLLM's log to a file instead, with errors still on the terminal, unless
asked to be verbose. It works through vLLM's documented `VLLM_LOGGING_CONFIG_PATH`, so EngineCore
and worker processes, which inherit the environment, write to the same file. Call it before
vLLM is imported: vLLM configures its logging once, at import.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

QUIET_ENV = "VLLM_SENTINEL_QUIET"  # set by route_vllm_logs; inherited by EngineCore and workers


def quiet_known_noise() -> None:
    """Silence two messages vLLM 0.32 prints on every CPU machine, harmless there and not ours:
    - "Triton is installed, but doesn't include CPU backend. Disabling Triton.": logged while vLLM's
      logger is still being set up (a circular import), so it bypasses any logging config and
      reaches stderr; vLLM then runs its torch fallbacks, as intended on CPU;
    - torch's FutureWarning "`torch.distributed.reduce_op` is deprecated", raised when vLLM's Triton
      dispatcher scans every module's attributes, torch.distributed's deprecated alias among them.
    Spawned processes re-import the main module, whose imports bring this module, before they
    import vLLM: with QUIET_ENV set they silence both again before either is printed."""
    logging.getLogger("vllm.triton_utils.importing").addFilter(
        lambda record: "doesn't include CPU backend" not in record.getMessage())
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.reduce_op` is deprecated", category=FutureWarning)


if os.environ.get(QUIET_ENV) == "1":
    quiet_known_noise()


def route_vllm_logs(log_file: str | Path, verbose: bool = False) -> Path | None:
    """Send vLLM's log (INFO and up) to `log_file` and only errors to the terminal; None if verbose."""
    if verbose or "VLLM_LOGGING_CONFIG_PATH" in os.environ:
        return None
    log_file = Path(log_file).resolve()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    line = "%(levelname)s %(asctime)s %(process)d [%(filename)s:%(lineno)d] %(message)s"
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": line}},
        "handlers": {
            "file": {"class": "logging.FileHandler", "filename": str(log_file), "mode": "a",
                     "formatter": "plain", "level": "INFO"},
            "terminal": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                         "formatter": "plain", "level": "ERROR"},
        },
        "loggers": {"vllm": {"handlers": ["file", "terminal"], "level": "INFO", "propagate": False}},
    }
    config_path = log_file.with_name(log_file.name + ".logging.json")
    config_path.write_text(json.dumps(config, indent=2))
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(config_path)
    os.environ[QUIET_ENV] = "1"
    quiet_known_noise()
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # torch's per-process NUMA binding warnings
    return log_file
