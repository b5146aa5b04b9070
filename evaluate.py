"""Evaluate a saved (dense or compressed) model: python evaluate.py [model_dir=...] dataset=..."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from odllm import config
from odllm.checks import user_errors
from odllm.runner.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@user_errors  # a bad input: one line `error: ...` (HYDRA_FULL_ERROR=1 shows the traceback)
def main(cfg: DictConfig) -> None:
    config.check_evaluate(cfg)  # every value evaluate.py reads, before the model is loaded
    evaluate(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
