"""The pure read of memory (csrc/memory_cpu.cpp) that the CPU decoding benchmark is measured against: it reads
every byte of its tensors, whatever their dtypes and sizes, however the threads share them."""

from __future__ import annotations

import functools
import operator

import pytest
import torch

from spikegpt_ft.ops import extension


def or_of_bytes(tensors: list[torch.Tensor]) -> int:
    """The OR of every byte, one byte at a time in Python."""
    return functools.reduce(operator.or_, (b for t in tensors for b in t.reshape(-1).view(torch.uint8).tolist()), 0)


@pytest.mark.parametrize("prefetch", ["none", "l1-2k", "l2-16k"])
@pytest.mark.parametrize("threads", [1, 2])
def test_every_byte_is_read_across_tensors_of_odd_sizes_and_thread_shares(threads, prefetch):
    g = torch.Generator().manual_seed(0)
    sizes = [3, 1, 777, (1 << 20) + 5, 64, (3 << 19) + 1, 9]  # odd byte counts; together more than two shares
    tensors = [torch.zeros(n, dtype=torch.uint8) for n in sizes]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert extension().read_bytes(tensors, prefetch) == 0
        for i, t in enumerate(tensors):  # one bit set anywhere in any tensor is seen, in each of 8 positions
            for bit in range(8):
                position = int(torch.randint(0, t.numel(), (1,), generator=g))
                t[position] = 1 << bit
                assert extension().read_bytes(tensors, prefetch) == 1 << bit, (i, position, bit)
                t[position] = 0
        # the first and last byte of every tensor, where shares and word boundaries fall
        for t in tensors:
            t[0], t[-1] = 0x11, 0x80
        assert extension().read_bytes(tensors, prefetch) == 0x91
    finally:
        torch.set_num_threads(previous)


def test_tensors_of_every_dtype_are_read_as_their_bytes():
    g = torch.Generator().manual_seed(1)
    tensors = [
        torch.randn(5, 7, generator=g).to(torch.bfloat16),
        torch.randint(-127, 128, (13,), generator=g, dtype=torch.int8),
        torch.randn(3, generator=g),
    ]
    assert extension().read_bytes(tensors) == or_of_bytes(tensors)
    assert extension().read_bytes([]) == 0


def test_a_tensor_that_is_not_contiguous_is_refused():
    with pytest.raises(RuntimeError, match="contiguous CPU tensor"):
        extension().read_bytes([torch.zeros(4, 4).t()])


def test_the_ways_of_reading_are_none_and_the_streaming_kernels_prefetches():
    ways = extension().read_prefetches()
    assert ways[0] == "none" and len(ways) == len(set(ways)) > 1
    try:
        for name in ways[1:]:  # each is a prefetch that the streaming products take too
            extension().set_stream_prefetch(name)
            assert extension().stream_prefetch() == name
    finally:
        extension().set_stream_prefetch("auto")


def test_an_unknown_prefetch_is_refused_with_the_known_ones():
    with pytest.raises(RuntimeError, match=r"unknown prefetch 'l3-1m' \(none, l1-2k, l2-16k\)"):
        extension().read_bytes([torch.zeros(8, dtype=torch.uint8)], "l3-1m")
