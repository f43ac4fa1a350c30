"""Every change vllm-sentinel makes to vLLM internals, one file per patched behaviour.

Installed as `vllm_sentinel.patches`. Each patch checks the vLLM version it was written for and
fails loudly on a mismatch rather than silently changing a different vLLM.
"""
