"""``python -m odllm.index dataset=<name>``: build a learned item index (see :mod:`odllm.index.build`)."""

from odllm.index.build import main

main()
