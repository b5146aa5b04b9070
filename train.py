"""Train an LC-Rec recommender: python train.py dataset=ml-100k (see conf/config.yaml)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from odllm.runner.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    train(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
