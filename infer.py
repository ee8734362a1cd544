"""Classify, evaluate or generate with SpikeGPT: ``python infer.py --checkpoint RUN --text "..."`` (``--help``)."""

import sys

from spikegpt_ft.cli.infer import main

if __name__ == "__main__":
    sys.exit(main())
