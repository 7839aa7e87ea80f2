"""quantize/kernels.py against references we did not write: gguf-py's quantizers and dequantizers,
libggml's own answers (sizes, imatrix rule, MXFP4 bytes) and torch's BF16 conversion."""

from __future__ import annotations

import ctypes

import gguf.quants as gq
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ossgguf.errors import OssggufError
from ossgguf.gguf import tensors as T
from ossgguf.quantize import kernels as K
from ossgguf.runner.llama_ctypes import ggml_lib, ggml_library_path

Q = GGMLQuantizationType
GPT_OSS_ROW = 2880  # gpt-oss hidden and expert width: not a multiple of 256

# Relative RMS error bounds on N(0, 1) rows, ~1.5x what these types give there: a wrong layout or
# scale gives errors near 1 or more.
REL_RMS = {
    Q.F32: 0.0, Q.F16: 3e-4, Q.BF16: 3e-3, Q.Q8_0: 0.008, Q.Q6_K: 0.027, Q.Q5_K: 0.055, Q.Q5_0: 0.065,
    Q.Q5_1: 0.06, Q.Q4_K: 0.11, Q.Q4_0: 0.13, Q.Q4_1: 0.12, Q.IQ4_NL: 0.12, Q.IQ4_XS: 0.12, Q.MXFP4: 0.17,
    Q.NVFP4: 0.15, Q.Q3_K: 0.23, Q.IQ3_S: 0.25, Q.IQ3_XXS: 0.32, Q.Q2_K: 0.45, Q.IQ2_S: 0.4, Q.IQ1_M: 0.85,
}  # fmt: skip
SLOW_INIT = {Q.IQ2_S, Q.IQ1_M}  # ggml builds their search grids on first use: 5-10 s
TERNARY = {Q.TQ1_0, Q.TQ2_0}  # only meant for ternary weights
GGUF_PY_QUANTIZERS = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.TQ1_0, Q.TQ2_0]


def _width(q: Q) -> int:
    return 3072 if K.block_size(q) > 64 else GPT_OSS_ROW


def _rows(q: Q, n_rows: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if q in TERNARY:
        return (rng.integers(-1, 2, (n_rows, _width(q))) * 0.37).astype(np.float32)
    return rng.standard_normal((n_rows, _width(q))).astype(np.float32)


def _ggml_quantize(x: np.ndarray, q: Q) -> np.ndarray:
    """Bytes straight from libggml's ggml_quantize_chunk (for MXFP4: quantize_row_mxfp4_ref)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    lib = ggml_lib()
    out = np.empty((x.shape[0], lib.ggml_row_size(int(q), x.shape[1])), dtype=np.uint8)
    lib.ggml_quantize_chunk(int(q), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
    return out


def _block_sse(data: np.ndarray, x: np.ndarray) -> np.ndarray:
    d = gq.dequantize(data, Q.MXFP4).astype(np.float64)
    return ((d - x) ** 2).reshape(-1, 32).sum(axis=1)


def _supported_params():
    return [pytest.param(q, marks=pytest.mark.slow) if q in SLOW_INIT else q for q in T.SUPPORTED_TYPES]


# ---------------------------------------------------------------- sizes and type rules


def test_sizes_match_gguf_py_and_ggml():
    lib = ggml_lib()
    for q in T.SUPPORTED_TYPES:
        n = _width(q)
        assert T.row_bytes(q, n) == gq.quant_shape_to_byte_shape((3, n), q)[-1] == lib.ggml_row_size(int(q), n)
        assert (lib.ggml_blck_size(int(q)), lib.ggml_type_size(int(q))) == GGML_QUANT_SIZES[q]
        assert T.tensor_bytes(q, (4, 3, n)) == 12 * T.row_bytes(q, n)


def test_imatrix_types_are_ggmls():
    lib = ggml_lib()
    asked = {q for q in Q if q.value < 64 and lib.ggml_quantize_requires_imatrix(int(q))}
    assert asked == set(T.IMATRIX_TYPES)
    for q in T.IMATRIX_TYPES:
        with pytest.raises(OssggufError, match="imatrix"):
            K.quantize_rows(np.zeros((1, 256), np.float32), q)


def test_unknown_or_unsupported_types():
    assert T.parse_type("mxfp4") is Q.MXFP4 and T.parse_type(" q8_0") is Q.Q8_0
    with pytest.raises(OssggufError, match="unknown tensor type 'q9_9'"):
        T.parse_type("q9_9")
    with pytest.raises(OssggufError, match="supported types"):
        K.quantize_rows(np.zeros((1, 256), np.float32), Q.Q8_K)


def test_row_width_2880_refuses_k_quants_and_3072_takes_them():
    ok = T.types_for_row(GPT_OSS_ROW)
    assert {Q.MXFP4, Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.IQ4_NL, Q.BF16} <= set(ok)
    assert not {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS, Q.IQ3_S, Q.TQ2_0} & set(ok)
    x = np.random.default_rng(1).standard_normal((2, GPT_OSS_ROW)).astype(np.float32)
    with pytest.raises(OssggufError) as err:
        K.quantize_rows(x, Q.Q4_K)
    msg = str(err.value)
    assert "Q4_K" in msg and "2880" in msg and "256" in msg and "MXFP4" in msg and "Q8_0" in msg
    with pytest.raises(OssggufError, match="Q6_K"):
        T.row_bytes(Q.Q6_K, GPT_OSS_ROW)
    assert {Q.Q4_K, Q.Q6_K, Q.IQ4_XS} <= set(T.types_for_row(3072))
    y = np.random.default_rng(1).standard_normal((2, 3072)).astype(np.float32)
    back = gq.dequantize(K.quantize_rows(y, Q.Q4_K), Q.Q4_K)
    assert np.sqrt(np.mean((back - y) ** 2)) < REL_RMS[Q.Q4_K]


# ---------------------------------------------------------------- every type against gguf-py


@pytest.mark.parametrize("q", _supported_params(), ids=lambda q: q.name)
def test_dequantized_by_gguf_py_within_type_error(q):
    x = _rows(q)
    got = K.quantize_rows(x, q)
    assert got.shape == (x.shape[0], T.row_bytes(q, x.shape[1])) and got.dtype == np.uint8
    back = gq.dequantize(got, q)
    rel = np.sqrt(np.mean((back - x) ** 2) / np.mean(x**2))
    assert rel <= (0.002 if q in TERNARY else REL_RMS[q]), rel
    bits = K.f32_to_bf16(x)  # the BF16 source path gives the bytes of its float32 widening
    assert np.array_equal(K.quantize_bf16_rows(bits, q), K.quantize_rows(K.bf16_to_f32(bits), q))


@pytest.mark.parametrize("q", GGUF_PY_QUANTIZERS, ids=lambda q: q.name)
def test_bytes_equal_gguf_py_quantize(q):
    x = _rows(q, seed=2)
    x[0, :64] = 0.0  # zero blocks
    ref = gq.quantize(x, q).view(np.uint8).reshape(x.shape[0], -1)
    assert np.array_equal(K.quantize_rows(x, q), ref)
    bits = K.f32_to_bf16(x)
    ref_bf16 = gq.quantize(K.bf16_to_f32(bits), q).view(np.uint8).reshape(x.shape[0], -1)
    assert np.array_equal(K.quantize_bf16_rows(bits, q), ref_bf16)


@pytest.mark.parametrize("q", [Q.F16, Q.BF16, Q.F32], ids=lambda q: q.name)
def test_float_types_equal_ggml(q):
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((4, 256)) * np.exp2(rng.integers(-30, 30, (4, 256)))).astype(np.float32)
    x[0, :8] = [np.inf, -np.inf, 0.0, -0.0, 1e-45, 6e-8, 65504.0, 65520.0]  # f16 edges, subnormals
    x[1, :4] = np.frombuffer(np.array([0x3F808000, 0x3F818000, 0x477FF000, 0x33000001], "<u4").tobytes(), "<f4")
    with np.errstate(over="ignore"):
        assert np.array_equal(K.quantize_rows(x, q), _ggml_quantize(x, q))


# ---------------------------------------------------------------- MXFP4


@pytest.mark.parametrize("dist", ["normal", "student_t3"])
@pytest.mark.parametrize("src", ["bf16", "f32"])
def test_mxfp4_never_worse_than_ggml(dist, src):
    rng = np.random.default_rng(3)
    shape = (64, GPT_OSS_ROW)
    x = (rng.standard_normal(shape) if dist == "normal" else rng.standard_t(3, shape)).astype(np.float32) * 0.02
    if src == "bf16":
        bits = K.f32_to_bf16(x)
        x = K.bf16_to_f32(bits)
        ours = K.quantize_bf16_rows(bits, Q.MXFP4)
    else:
        ours = K.quantize_rows(x, Q.MXFP4)
    ref = _ggml_quantize(x, Q.MXFP4)
    assert np.array_equal(ref, gq.quantize(x, Q.MXFP4))  # the two references agree
    o, r = ours.reshape(-1, 17), ref.reshape(-1, 17)
    same = o[:, 0] == r[:, 0]
    assert np.array_equal(o[same], r[same])  # same scale: ggml's bytes, ties included
    assert np.all(o[~same, 0] == r[~same, 0] + 1)  # else one step up ...
    sse_o, sse_r = _block_sse(ours, x), _block_sse(ref, x)
    assert np.all(sse_o[~same] < sse_r[~same])  # ... and strictly better
    assert sse_o.sum() < 0.97 * sse_r.sum()  # ~5% lower MSE on such data
    nib = np.concatenate([o[:, 1:] & 0x0F, o[:, 1:] >> 4])
    assert not np.any(nib == 8)  # never a negative-zero code


def test_mxfp4_values_from_mxfp4_round_trip_bit_exact():
    rng = np.random.default_rng(4)
    # Standard-rule MXFP4 (gguf-py's quantizer) at magnitudes from 2^-60 to 2^60.
    x = rng.standard_normal((48, 256)) * np.exp2(rng.integers(-60, 60, (48, 1)))
    std = gq.quantize(x.astype(np.float32), Q.MXFP4)
    vals = gq.dequantize(std, Q.MXFP4)
    bits = K.f32_to_bf16(vals)
    assert np.array_equal(K.bf16_to_f32(bits), vals)  # MXFP4 values are exact in BF16
    assert np.array_equal(K.quantize_bf16_rows(bits, Q.MXFP4), std)
    assert np.array_equal(K.quantize_rows(vals, Q.MXFP4), std)
    # Any MXFP4 bytes (any scale, negative zeros, small maxima): the same values come back.
    raw = rng.integers(0, 256, (48, 8, 17), dtype=np.uint8)
    raw[..., 0] = rng.integers(1, 251, (48, 8))
    raw[:4, :, 1:] &= 0x33  # blocks whose largest code is 1.5 (a smaller standard scale)
    raw = raw.reshape(48, -1)
    vals = gq.dequantize(raw, Q.MXFP4)
    again = K.quantize_bf16_rows(K.f32_to_bf16(vals), Q.MXFP4)
    assert np.array_equal(gq.dequantize(again, Q.MXFP4), vals)
    assert np.array_equal(again, K.quantize_rows(vals, Q.MXFP4))


def test_mxfp4_edge_blocks():
    rng = np.random.default_rng(5)
    b = np.zeros((7, 32), np.float32)
    b[1] = -0.0
    b[2, 3], b[2, 5] = 1e-40, -3e-39  # subnormal maximum
    b[3] = rng.standard_normal(32) * 1e-37
    b[4] = rng.standard_normal(32)
    b[4, 7] = 1e-40  # a subnormal inside a normal block
    b[5] = rng.uniform(-3e38, 3e38, 32)  # near the float32 maximum
    b[6] = rng.standard_normal(32) * 2.0**-122  # just above the bit path's limit
    bits = K.f32_to_bf16(b)
    x = K.bf16_to_f32(bits)
    ours = K.quantize_bf16_rows(bits, Q.MXFP4)
    assert np.array_equal(ours, K.quantize_rows(x, Q.MXFP4))
    with np.errstate(over="ignore", invalid="ignore"):
        ref_sse = _block_sse(gq.quantize(x, Q.MXFP4), x.astype(np.float64))
        our_sse = _block_sse(ours, x.astype(np.float64))
    assert np.all(our_sse <= ref_sse) and np.all(np.isfinite(our_sse))
    assert np.all(ours[:2] == 0)  # zero blocks: scale byte 0 and +0 codes, as ggml writes them
    for bad in (np.inf, -np.inf, np.nan):
        y = x.copy()
        y[4, 0] = bad
        with pytest.raises(OssggufError, match="Inf or NaN"):
            K.quantize_rows(y, Q.MXFP4)


# ---------------------------------------------------------------- threads, shapes, BF16


@pytest.mark.parametrize("q", [Q.MXFP4, Q.Q8_0, Q.Q4_K, Q.BF16, Q.F16], ids=lambda q: q.name)
def test_threads_give_identical_bytes(q, monkeypatch):
    x = np.random.default_rng(6).standard_normal((37, 3072)).astype(np.float32)
    whole = K.quantize_rows(x, q, threads=1)
    monkeypatch.setattr(K, "_CHUNK_ELEMS", 3 * 3072)  # 13 chunks over 3 workers
    assert np.array_equal(K.quantize_rows(x, q, threads=3), whole)
    assert np.array_equal(K.quantize_rows(x, q, threads=2), whole)
    assert np.array_equal(K.quantize_bf16_rows(K.f32_to_bf16(x), q, threads=3),
                          K.quantize_bf16_rows(K.f32_to_bf16(x), q, threads=1))


def test_shapes_out_and_strided_input():
    x = np.random.default_rng(7).standard_normal((2, 3, 4, 64)).astype(np.float32)
    got = K.quantize_rows(x, Q.Q8_0)
    assert got.shape == (2, 3, 4, 68)
    assert np.array_equal(got.reshape(24, 68), K.quantize_rows(x.reshape(24, 64), Q.Q8_0))
    out = np.zeros((2, 3, 4, 68), np.uint8)
    assert K.quantize_rows(x, Q.Q8_0, out=out) is out and np.array_equal(out, got)
    with pytest.raises(ValueError):
        K.quantize_rows(x, Q.Q8_0, out=np.zeros((24, 68), np.uint8))
    t = np.ascontiguousarray(x.reshape(24, 64).T).T  # Fortran order: chunks are made contiguous
    assert np.array_equal(K.quantize_rows(t, Q.MXFP4), K.quantize_rows(x.reshape(24, 64), Q.MXFP4))
    assert np.array_equal(K.quantize_rows(x.astype(np.float16), Q.Q4_0),
                          K.quantize_rows(x.astype(np.float16).astype(np.float32), Q.Q4_0))
    assert K.quantize_rows(np.zeros((0, 64), np.float32), Q.MXFP4).shape == (0, 34)


def test_bf16_conversion_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    u = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    special = np.array([0x3F808000, 0x3F818000, 0x3F807FFF, 0x7F7FFFFF, 0x7F7F8000, 0x00000001, 0x80008000,
                        0x7F800000, 0xFF800000, 0x80000000, 0x00000000], dtype=np.uint32)  # ties, overflow, tiny
    x = np.concatenate([u, special]).view(np.float32)
    finite = ~np.isnan(x)
    want = torch.from_numpy(x[finite]).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = K.f32_to_bf16(x)
    assert np.array_equal(got[finite], want)
    assert np.array_equal(got, gq.quantize(x, Q.BF16).view(np.uint16))  # NaN as ggml: quiet, sign kept
    assert np.all(np.isnan(K.bf16_to_f32(got[~finite])))
    b = rng.integers(0, 2**16, 100_000, dtype=np.uint16)
    t = torch.from_numpy(b.view(np.int16)).view(torch.bfloat16).to(torch.float32).numpy()
    assert np.array_equal(K.bf16_to_f32(b).view(np.uint32), t.view(np.uint32))


def test_missing_library_is_a_clear_error(tmp_path):
    with pytest.raises(OssggufError, match="LLAMA_CPP_LIB_PATH"):
        ggml_library_path([tmp_path])
    assert ggml_library_path().name.startswith(("libggml", "ggml"))
    assert isinstance(ggml_lib(), ctypes.CDLL)
