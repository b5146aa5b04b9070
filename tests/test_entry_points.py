"""Every documented ``python -m`` entry point starts and finds its Hydra config, from any working directory."""

import subprocess
import sys

import pytest

# the Hydra ones: their config lies outside the package, which ``python -m`` must still find
MODULES = ["odllm.index", "odllm.bench.compression", "odllm.bench.inference", "odllm.data.prepare"]


@pytest.mark.parametrize("module", MODULES)
def test_module_entry_point_answers_help(module, tmp_path):
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "powered by Hydra" in done.stdout
