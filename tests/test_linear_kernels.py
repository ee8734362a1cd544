"""The CPU streaming product (csrc/linear_cpu.cpp) against a float64 product written here: every kernel
this CPU runs, bfloat16 and int8 weights, odd sizes, 1 to 64 rows; int8 weights by bfloat16 rows in integers
(csrc/int8_digits.h) against the exact product; the AMX products (csrc/amx_linear.cpp)."""

from __future__ import annotations

import pytest
import torch

from spikegpt_ft.ops import extension, linear

KERNELS = extension().linear_kernels()
#: Half an ulp of bfloat16 (8 significant bits), relative.
BF16_ROUNDING = 2.0**-8


def _weights(kind: str, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(stored weight, scale or None, the float64 weight they stand for)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "int8":
        w8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        scale = (torch.rand(n, generator=g) * 0.02 + 1e-3).to(torch.bfloat16)
        return w8, scale, w8.double() * scale.double()[:, None]
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    return w, None, w.double()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 64])
@pytest.mark.parametrize(("n", "k"), [(1, 1), (7, 5), (13, 29), (300, 40), (37, 768), (9, 1031)])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_stream_product_is_the_float64_product_up_to_float32_sums_and_one_rounding(kernel, kind, rows, n, k, x_dtype):
    weight, scale, w = _weights(kind, n, k, seed=n * k)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g).to(x_dtype)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    out = extension().stream_linear(x, weight, scale, bias, kernel)
    assert out.shape == (rows, n) and out.dtype == x_dtype
    reference = x.double() @ w.T + bias.double()
    terms = x.double().abs() @ w.abs().T + bias.double().abs()
    rounding = BF16_ROUNDING if x_dtype == torch.bfloat16 else 2.0**-24
    # float32 sums of k + 1 terms (and the scale's product), then one rounding to x's dtype
    bound = (k + 3) * 2.0**-24 * terms * (1 + rounding) + rounding * reference.abs()
    assert torch.all((out.double() - reference).abs() <= bound)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
def test_a_row_gets_the_same_bits_alone_as_among_many(kernel, kind):
    """What makes a decoded token equal its parallel pass: the sums do not depend on the number of rows."""
    weight, scale, _ = _weights(kind, 301, 771, seed=5)
    x = torch.randn(70, 771, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    together = extension().stream_linear(x, weight, scale, None, kernel)
    for i in (0, 3, 4, 69):
        assert torch.equal(extension().stream_linear(x[i : i + 1], weight, scale, None, kernel)[0], together[i])


PREFETCHES = ["l1-2k", "l2-16k"]


@pytest.fixture
def restore_prefetch():
    """Give the streaming kernel back its measured prefetch after a test that sets one."""
    yield
    extension().set_stream_prefetch("auto")


def test_the_measured_prefetch_is_a_candidate_and_kept():
    """Measured once (at the first call) among the candidates; "none" where only the portable kernel runs."""
    chosen = extension().stream_prefetch()
    assert chosen in (["none"] if KERNELS == ["portable"] else PREFETCHES)
    assert all(extension().stream_prefetch() == chosen for _ in range(3))


@pytest.mark.parametrize("kernel", [k for k in KERNELS if k != "portable"])
@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
def test_every_prefetch_gives_the_same_bits(kernel, kind, restore_prefetch):
    """A prefetch only moves weights into a cache early: one to four rows (the weights read from memory, where the
    kernels prefetch) get the same bits under each, and the product stays the float64 one's within the bound."""
    weight, scale, w = _weights(kind, 301, 1031, seed=8)
    x = torch.randn(4, 1031, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    results = {}
    for prefetch in PREFETCHES:
        extension().set_stream_prefetch(prefetch)
        assert extension().stream_prefetch() == prefetch
        results[prefetch] = [extension().stream_linear(x[:rows], weight, scale, None, kernel) for rows in (1, 2, 3, 4)]
    reference = x.double() @ w.T
    bound = 1034 * 2.0**-24 * (x.double().abs() @ w.abs().T) * (1 + BF16_ROUNDING) + BF16_ROUNDING * reference.abs()
    for rows in (1, 2, 3, 4):
        first = results[PREFETCHES[0]][rows - 1]
        assert all(torch.equal(results[p][rows - 1], first) for p in PREFETCHES)
        assert torch.all((first.double() - reference[:rows]).abs() <= bound[:rows])


def test_an_unknown_prefetch_is_refused(restore_prefetch):
    with pytest.raises(RuntimeError, match="unknown prefetch 'l3'"):
        extension().set_stream_prefetch("l3")


@pytest.mark.skipif(KERNELS == ["portable"], reason="only the vector kernels prefetch")
def test_the_package_fixes_the_prefetch_and_gives_the_measured_one_back(restore_prefetch):
    measured = linear.stream_prefetch()
    other = next(p for p in PREFETCHES if p != measured)
    linear.set_stream_prefetch(other)
    assert linear.stream_prefetch() == other
    linear.set_stream_prefetch("auto")
    assert linear.stream_prefetch() == measured
    with pytest.raises(RuntimeError, match=r"unknown prefetch 'l2' \(auto, l1-2k, l2-16k\)"):
        linear.set_stream_prefetch("l2")


def test_bad_calls_are_refused_clearly():
    w = torch.zeros(4, 8, dtype=torch.bfloat16)
    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="unknown kernel 'avx9'"):
        extension().stream_linear(x, w, None, None, "avx9")
    with pytest.raises(RuntimeError, match="int8 weights need a scale"):
        extension().stream_linear(x, w.to(torch.int8), None, None, "auto")
    with pytest.raises(RuntimeError, match="bfloat16 or int8"):
        extension().stream_linear(x, w.float(), None, None, "auto")
    with pytest.raises(RuntimeError, match=r"x must be \[M, K\]"):
        extension().stream_linear(x[:, :5], w, None, None, "auto")
    with pytest.raises(RuntimeError, match="one value per output"):
        extension().stream_linear(x, w, None, torch.zeros(3), "auto")


integers = pytest.mark.skipif("avx512-vnni" not in KERNELS, reason="this CPU has no AVX512-VNNI")


def _bfloat16_rows(rows: int, k: int, binades: int, seed: int) -> torch.Tensor:
    """bfloat16 rows whose magnitudes span ``binades`` powers of two: 2^e (1 + u), e uniform, random signs."""
    g = torch.Generator().manual_seed(seed)
    exponent = torch.randint(-binades // 2, binades - binades // 2, (rows, k), generator=g).double()
    magnitude = (1 + torch.rand(rows, k, generator=g, dtype=torch.float64)) * 2.0**exponent
    sign = torch.where(torch.rand(rows, k, generator=g) < 0.5, -1.0, 1.0).double()
    return (sign * magnitude).to(torch.bfloat16)


INTEGER_SIZES = [(1, 1), (7, 5), (13, 29), (300, 40), (33, 130), (37, 768), (9, 1031), (64, 3072)]


@integers
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 17, 64, 130])
@pytest.mark.parametrize(("n", "k"), INTEGER_SIZES)
def test_int8_by_bfloat16_rows_is_the_exact_product_rounded(rows, n, k):
    """int8 weights by bfloat16 rows whose elements lie within 2^14 of each other: the integer kernels (VNNI up to
    four rows, AMX-INT8 beyond where the CPU has it) sum exactly, so each output is the exact sum times the scale,
    rounded to double, float32 and bfloat16, bit for bit. The float64 product here is exact too: every term has
    at most 15 significant bits, and all are multiples of the smallest term's unit within 2^41 of it."""
    weight, scale, _ = _weights("int8", n, k, seed=n * k)
    x = _bfloat16_rows(rows, k, binades=13, seed=rows + k)
    out = extension().stream_linear(x, weight, scale, None, "avx512-vnni")
    exact = x.double() @ weight.double().T
    assert torch.equal(out, (exact * scale.double()).float().to(torch.bfloat16))


@integers
def test_the_integer_kernels_scale_bias_and_round_alike():
    """A row alone (VNNI, scalar output) and among 70 (AMX-INT8, outputs 16 at a time) get the same bits with a
    scale and a bias, an infinite and a NaN bias included (a NaN rounds to bfloat16's quiet NaN, 0x7fc0)."""
    weight, scale, _ = _weights("int8", 301, 771, seed=13)
    x = torch.randn(70, 771, generator=torch.Generator().manual_seed(14)).to(torch.bfloat16)
    bias = torch.randn(301, generator=torch.Generator().manual_seed(15)).to(torch.bfloat16)
    bias[[7, 300]] = torch.tensor([float("inf"), float("nan")], dtype=torch.bfloat16)
    together = extension().stream_linear(x, weight, scale, bias, "avx512-vnni").view(torch.int16)
    assert torch.all(together[:, 300] == 0x7FC0) and torch.all(together[:, 7] == 0x7F80)
    for i in (0, 15, 16, 69):
        alone = extension().stream_linear(x[i : i + 1], weight, scale, bias, "avx512-vnni").view(torch.int16)
        assert torch.equal(alone[0], together[i])


@integers
def test_many_rows_go_in_panels_with_the_same_bits():
    """More rows than one panel of AMX-INT8 B tiles holds (96 rows at a 3072-wide reduction): each row still gets
    the exact product rounded, the same bits as alone (VNNI), across the panels' edges."""
    weight, scale, _ = _weights("int8", 45, 3072, seed=11)
    x = _bfloat16_rows(250, 3072, binades=13, seed=12)
    out = extension().stream_linear(x, weight, scale, None, "avx512-vnni")
    exact = x.double() @ weight.double().T
    assert torch.equal(out, (exact * scale.double()).float().to(torch.bfloat16))
    for i in (0, 95, 96, 191, 192, 249):
        assert torch.equal(extension().stream_linear(x[i : i + 1], weight, scale, None, "avx512-vnni")[0], out[i])


@integers
@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize(("n", "k"), INTEGER_SIZES)
def test_int8_by_rows_of_any_range_is_within_half_a_unit_of_22_bits(rows, n, k):
    """Rows spanning 2^40: each element is rounded to a multiple of 2^(e - 22) (every |x| of the row < 2^e), at most
    2^-22 of the row's largest away, the sums are exact, then one fused scale and bias and one rounding each to
    float32 and bfloat16."""
    weight, scale, w = _weights("int8", n, k, seed=n + k)
    x = _bfloat16_rows(rows, k, binades=40, seed=rows * k)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(k)).to(torch.bfloat16)
    out = extension().stream_linear(x, weight, scale, bias, "avx512-vnni")
    reference = x.double() @ w.T + bias.double()
    largest = x.double().abs().amax(dim=1, keepdim=True)
    bound = 2.0**-22 * largest * w.abs().sum(dim=1) + (BF16_ROUNDING + 2.0**-23) * reference.abs()
    assert torch.all((out.double() - reference).abs() <= bound)


@integers
def test_int8_products_the_integers_cannot_hold_go_to_the_float32_kernel():
    """float32 rows (22-bit integers would round them), rows with an infinity or a NaN, and reductions longer than
    65536 (whose sums would overflow 32 bits) get the float32 kernel's bits."""
    weight, scale, _ = _weights("int8", 37, 768, seed=1)
    x = torch.randn(3, 768, generator=torch.Generator().manual_seed(2))
    cases = [(x, weight, scale), (x.to(torch.bfloat16), weight, scale)]
    cases[1][0][1, 5] = float("inf")
    cases[1][0][2, 7] = float("nan")
    long_weight, long_scale, _ = _weights("int8", 3, 65537, seed=3)
    cases.append((torch.randn(2, 65537).to(torch.bfloat16), long_weight, long_scale))
    for rows, w, s in cases:
        integers_out = extension().stream_linear(rows, w, s, None, "avx512-vnni")
        float_out = extension().stream_linear(rows, w, s, None, "avx512")
        torch.testing.assert_close(integers_out, float_out, rtol=0, atol=0, equal_nan=True)
    assert integers_out.isfinite().all()


bf16_products = pytest.mark.skipif("avx512-bf16" not in KERNELS, reason="this CPU has no AVX512-BF16")


@bf16_products
def test_avx512_bf16_sends_what_vdpbf16ps_does_not_take_to_the_avx512_vnni_kernel():
    """VDPBF16PS multiplies bfloat16 weights by bfloat16 rows only: float32 rows (which it would round) and int8
    weights get the avx512-vnni kernel's bits, one to five rows (five: the cache's way) with a scale and bias."""
    bias = torch.randn(37, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    for kind, x_dtype in (("bfloat16", torch.float32), ("int8", torch.bfloat16), ("int8", torch.float32)):
        weight, scale, _ = _weights(kind, 37, 771, seed=4)
        for rows in (1, 2, 5):
            x = torch.randn(rows, 771, generator=torch.Generator().manual_seed(rows)).to(x_dtype)
            bf16_out = extension().stream_linear(x, weight, scale, bias, "avx512-bf16")
            assert torch.equal(bf16_out, extension().stream_linear(x, weight, scale, bias, "avx512-vnni"))


@bf16_products
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_avx512_bf16_products_are_exact_through_the_last_partial_block(rows):
    """Values whose products and partial sums float32 holds exactly give exact outputs, the last partial 32-wide
    block included (45 = 32 + 13). The rows after each row of x and of the weight hold large values, so a load past
    K (which in [M, K] memory reads the next row) would show; (1 + 2^-7)^2 - (1 + 2^-6) = 2^-14 needs the products
    of the bfloat16 values themselves, summed in float32."""
    k = 45
    x = torch.full((rows, k), 1024.0, dtype=torch.bfloat16)
    w = torch.full((4, k), 512.0, dtype=torch.bfloat16)
    x[0], w[:3] = 0, 0
    x[0, 3], w[0, 3] = 1 + 2**-7, 1 + 2**-7
    x[0, 32:40] = 3.0
    x[0, 40], w[0, 40] = 1.0, -(1 + 2**-6)  # in the partial block
    w[1, 32:] = 2.0**-10
    x[0, 44], w[2, 44] = 0.75, 0.5  # the last element
    out = extension().stream_linear(x, w, None, None, "avx512-bf16")
    assert out[0, :3].tolist() == [2.0**-14, 8 * 3 * 2.0**-10 + 2.0**-10 + 0.75 * 2.0**-10, 0.375]
    assert torch.equal(out, (x.double() @ w.double().T).to(torch.bfloat16))  # every sum here is exact in float32


@bf16_products
def test_the_reported_kernel_is_the_one_that_runs():
    """``product_kernel`` names the streaming kernel that multiplies each kind of weight: VDPBF16PS's for bfloat16,
    the integers' (avx512-vnni) for int8, whose bits equal the named kernel's."""
    assert linear.product_kernel(1, torch.bfloat16) == "stream-avx512-bf16"
    assert linear.product_kernel(1, torch.int8) == "stream-avx512-vnni"
    weight, scale, _ = _weights("int8", 9, 100, seed=1)
    x = torch.randn(2, 100, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    auto = extension().stream_linear(x, weight, scale, None, "auto")
    assert torch.equal(auto, extension().stream_linear(x, weight, scale, None, "avx512-vnni"))


@bf16_products
def test_avx512_bf16_takes_denormal_inputs_as_zero():
    """VDPBF16PS reads denormal bfloat16 inputs as zero (Intel SDM: DAZ whatever MXCSR says), as AMX and oneDNN's
    bfloat16 products do: 2^-130 x 2^100 gives 0 here, where the float32 kernel gives 2^-30."""
    x = torch.tensor([[2.0**-130, 1.0]], dtype=torch.bfloat16)
    w = torch.tensor([[2.0**100, 0.0], [2.0**100, 1.0]], dtype=torch.bfloat16)
    assert x[0, 0].item() == 2.0**-130  # a bfloat16 denormal, stored exactly
    assert extension().stream_linear(x, w, None, None, "avx512-bf16").tolist() == [[0.0, 1.0]]
    assert extension().stream_linear(x, w, None, None, "avx512-vnni").tolist() == [[2.0**-30, 1.0]]


amx = pytest.mark.skipif(not extension().amx_usable(), reason="this CPU cannot run the AMX kernel (no AMX-BF16)")


@amx
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 17, 64, 130])
@pytest.mark.parametrize(("n", "k"), [(1, 1), (7, 5), (13, 29), (300, 40), (37, 768), (9, 1031), (64, 3072)])
@pytest.mark.parametrize("bias", [False, True])
def test_amx_product_is_the_float64_product_up_to_float32_sums_and_one_rounding(rows, n, k, bias):
    """The AMX kernel, sizes that do and do not fill its tiles (16 rows, 32 outputs, 32-wide reductions)."""
    weight, _, w = _weights("bfloat16", n, k, seed=n * k)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
    out = extension().amx_linear(x, extension().amx_pack_weight(weight), n, b)
    assert out.shape == (rows, n) and out.dtype == torch.bfloat16
    reference = x.double() @ w.T + (b.double() if bias else 0)
    terms = x.double().abs() @ w.abs().T + (b.double().abs() if bias else 0)
    bound = (k + 3) * 2.0**-24 * terms * (1 + BF16_ROUNDING) + BF16_ROUNDING * reference.abs()
    assert torch.all((out.double() - reference).abs() <= bound)


@amx
@pytest.mark.parametrize(("rows", "n", "k"), [(16, 40, 32), (64, 37, 768), (32, 64, 3072)])
def test_amx_reads_whole_tiles_of_x_in_place_with_the_bits_of_its_padded_copy(rows, n, k):
    """Rows filling whole tiles are read from x itself; one row more sends them through the zero-padded copy."""
    weight, _, _ = _weights("bfloat16", n, k, seed=rows + k)
    packed = extension().amx_pack_weight(weight)
    x = torch.randn(rows + 1, k, generator=torch.Generator().manual_seed(k)).to(torch.bfloat16)
    in_place = extension().amx_linear(x[:rows], packed, n, None)
    through_copy = extension().amx_linear(x, packed, n, None)[:rows]
    assert torch.equal(in_place, through_copy)


@amx
def test_amx_packing_is_the_weight_tile_by_tile():
    """The layout the kernel reads: pairs of 16 outputs, 32-wide blocks of k, neighbouring k side by side."""
    weight = torch.arange(45 * 70, dtype=torch.float32).view(45, 70).to(torch.bfloat16)
    packed = extension().amx_pack_weight(weight)
    assert packed.shape == (2, 3, 2, 16, 16, 2)
    for n, k in [(0, 0), (1, 0), (0, 1), (17, 33), (44, 69), (31, 2)]:
        pair, tile, row = n // 32, n % 32 // 16, n % 16
        assert torch.equal(packed[pair, k // 32, tile, k % 32 // 2, row, k % 2], weight[n, k])
    padding = torch.ones(64, 96, dtype=torch.bool)
    padding[:45, :70] = False
    unpacked = packed.permute(0, 2, 4, 1, 3, 5).reshape(64, 96)
    assert torch.equal(unpacked[:45, :70], weight) and not unpacked[padding].any()


@amx
def test_bad_amx_calls_are_refused_clearly():
    w = torch.zeros(40, 64, dtype=torch.bfloat16)
    packed = extension().amx_pack_weight(w)
    x = torch.zeros(8, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"not amx_pack_weight of a \[40, 96\] weight"):
        extension().amx_linear(torch.zeros(8, 96, dtype=torch.bfloat16), packed, 40, None)
    with pytest.raises(RuntimeError, match=r"not amx_pack_weight of a \[70, 64\] weight"):
        extension().amx_linear(x, packed, 70, None)
    with pytest.raises(RuntimeError, match="x must be a"):
        extension().amx_linear(x.float(), packed, 40, None)
    with pytest.raises(RuntimeError, match="one value per output"):
        extension().amx_linear(x, packed, 40, torch.zeros(3))
    with pytest.raises(RuntimeError, match="2-D bfloat16"):
        extension().amx_pack_weight(w.float())
