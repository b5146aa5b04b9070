"""Evaluate a saved (dense or compressed) model: python evaluate.py [model_dir=...] dataset=..."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from odllm.runner.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    evaluate(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
