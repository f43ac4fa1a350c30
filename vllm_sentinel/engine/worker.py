"""`SentinelCPUWorker`: vLLM's CPU worker running the sentinel model runner."""
from __future__ import annotations

import torch
from vllm.v1.worker.cpu_worker import CPUWorker

from .model_runner import SentinelCPUModelRunner


class SentinelCPUWorker(CPUWorker):
    def init_device(self) -> None:
        # CPUWorker builds its runner at the end of init_device (thread binding and the distributed
        # setup come first); the runner holds no model yet, so replacing it here is cheap.
        super().init_device()
        if self.use_v2_model_runner:
            raise NotImplementedError("the sentinel backend runs on vLLM's V1 model runner; "
                                      "unset VLLM_USE_V2_MODEL_RUNNER")
        self.model_runner = SentinelCPUModelRunner(self.vllm_config, torch.device("cpu"))
