"""Data: the NLU tasks' files and splits, language-model text, the tokenizer, and batches.

- ``tasks.py``: the four tasks and where their files are; ``reading.py``: the one line reader.
- ``splits.py``: train / validation / test splits and tokenisation; ``classification.py``: their DataModule.
- ``text.py``: plain-text corpora split by document and packed into windows, and their DataModule.
- ``batching.py``: right padding, the resumable length-bucketed sampler, loaders; ``tokenizer.py``.
"""

from .batching import BucketBatchSampler, ResumableLoader, collate, make_loader, pad_right
from .classification import TaskDataModule
from .reading import ReadReport, decode_lines, read_lines, read_task
from .splits import build_splits, split_fingerprint, stratified_subset, tokenize_splits
from .tasks import TASKS, TaskSpec, find_data_dir, get_task
from .text import TextDataModule, pack_windows, read_documents, split_documents
from .tokenizer import EOS_ID, PAD_ID, find_tokenizer, load_tokenizer, token_byte_lengths

__all__ = [
    "EOS_ID",
    "PAD_ID",
    "TASKS",
    "BucketBatchSampler",
    "ReadReport",
    "ResumableLoader",
    "TaskDataModule",
    "TaskSpec",
    "TextDataModule",
    "build_splits",
    "collate",
    "decode_lines",
    "find_data_dir",
    "find_tokenizer",
    "get_task",
    "load_tokenizer",
    "make_loader",
    "pack_windows",
    "pad_right",
    "read_documents",
    "read_lines",
    "read_task",
    "split_documents",
    "split_fingerprint",
    "stratified_subset",
    "token_byte_lengths",
    "tokenize_splits",
]
