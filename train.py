"""Fine-tune SpikeGPT (full, LoRA or SpikeLoRA) on Subj, MR, SST-2 or SST-5: ``python train.py --help``."""

import sys

from spikegpt_ft.train_cli import main

if __name__ == "__main__":
    sys.exit(main())
