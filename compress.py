"""Compress a trained recommender: python compress.py [ratio=0.5] [method=odllm]

Methods (conf/method/): odllm, svd, svd_whiten, svd_align, asvd (low rank, sized by ``ratio``); gptq, gptq8,
sparsegpt, sparsegpt24, bnb_int8, bnb_nf4 (sized by their own settings).
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from odllm.checks import user_errors
from odllm.runner.compress import compress


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@user_errors  # a bad input: one line `error: ...` (HYDRA_FULL_ERROR=1 shows the traceback)
def main(cfg: DictConfig) -> None:
    compress(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
