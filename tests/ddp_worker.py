"""Started by torchrun from test_train.py: train one run, then save this rank's weights."""

import logging
import os
import sys

import torch

from volttl.config import load_config
from volttl.train.step import train_rounds

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format=f"rank{os.environ['RANK']}: %(message)s")
    config, run_dir, out_prefix = sys.argv[1:4]
    _, model = train_rounds(load_config(config), run_dir, progress=False)
    torch.save(model.state_dict(), f"{out_prefix}_rank{os.environ['RANK']}.pt")
