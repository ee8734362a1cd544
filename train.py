"""Fine-tune or pretrain SpikeGPT: ``python train.py --adapter spikelora --task subj`` (``--help`` for more)."""

import sys

from spikegpt_ft.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
