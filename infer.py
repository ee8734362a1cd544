"""Classify texts token by token with a fine-tuned SpikeGPT, or generate text with a base SpikeGPT.

See ``python infer.py --help`` and :mod:`spikegpt_ft.infer_cli`.
"""

import sys

from spikegpt_ft.infer_cli import main

if __name__ == "__main__":
    sys.exit(main())
