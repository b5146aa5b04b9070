"""Train an LC-Rec recommender: python train.py dataset=ml-100k (see conf/config.yaml)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from odllm.checks import user_errors
from odllm.runner.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@user_errors  # a bad input: one line `error: ...` (HYDRA_FULL_ERROR=1 shows the traceback)
def main(cfg: DictConfig) -> None:
    train(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
