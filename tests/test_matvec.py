"""matvec_cpu.c (matvec.py), the S-Part's bf16 matmuls at a few rows: against the float64 reference
and oneDNN, the rows it is given (and not given), its refusals, and a decode step with and without
it (Llama's layer halves in one C call each against spart.py's torch forward).

On a CPU with AVX512_BF16 the library must load (the tests fail, not skip, if it does not);
elsewhere only the stub's refusal is tested."""
import ctypes
import os
import subprocess

import pytest
import torch

import fast
import matvec
import spart

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_BF16 = fast.cpu_bf16_fast() is not None
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16 dot-product instructions")


def bf16(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).to(torch.bfloat16)


@needs_bf16
def test_the_library_loads_where_the_cpu_has_bf16():
    assert matvec.matvec_lib() is not None and matvec.can_tile(torch.device("cpu"), torch.bfloat16)
    assert not matvec.can_tile(torch.device("cpu"), torch.float32)


@needs_bf16
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("N,K", [(8, 32), (96, 64), (960, 576), (576, 1536)])
def test_matvec_equals_the_float64_reference(M, N, K):
    torch.manual_seed(M * 1000 + N + K)
    x, w, b = bf16(M, K), bf16(N, K, scale=0.05), bf16(N)
    y = matvec.matvec(x, matvec.tile_pack(w, b))
    ref = x.double() @ w.double().T + b.double()
    # one bf16 rounding of the result (2^-8 relative at most), and float32 sums of K products
    bound = 2 ** -8 * ref.abs() + 2 ** -20 * (x.double().abs() @ w.double().abs().T + b.double().abs())
    err = (y.double() - ref).abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), f"M {M} [{N}, {K}]: worst error {err.flatten()[worst]:.3e} " \
                                 f"over bound {bound.flatten()[worst]:.3e} (ref {ref.flatten()[worst]:.4f})"


@needs_bf16
@pytest.mark.parametrize("M", [1, 3, 8])
def test_matvec_equals_onednn_within_a_rounding(M):
    torch.manual_seed(M)
    x, w, b = bf16(M, 576), bf16(960, 576, scale=0.05), bf16(960)
    ours, theirs = matvec.matvec(x, matvec.tile_pack(w, b)).float(), fast.linear(x, fast.prepack(w), b).float()
    # the same fp32 sums in another order, each rounded once to bf16: at most one bf16 step apart
    assert ((ours - theirs).abs() <= 2 ** -7 * theirs.abs() + 1e-6).all()
    assert (ours == theirs).float().mean() > 0.9     # and almost always bit-equal


@needs_bf16
def test_linear_sends_only_small_calls_to_matvec(monkeypatch):
    w = bf16(64, 64)
    tiles, dnn, seen = matvec.tile_pack(w), fast.prepack(w), []
    real = matvec.matvec
    monkeypatch.setattr(fast, "matvec", lambda x, t: seen.append(x.shape[0]) or real(x, t))
    for M in (1, fast.MATVEC_ROWS, fast.MATVEC_ROWS + 1, 64):
        out = fast.linear(bf16(M, 64), dnn, None, tiles)
        assert out.shape == (M, 64) and out.dtype == torch.bfloat16
    assert seen == [1, fast.MATVEC_ROWS]


@needs_bf16
def test_bad_input_is_refused():
    tiles = matvec.tile_pack(bf16(64, 64))
    for x in (torch.randn(1, 64), bf16(1, 32), bf16(64), bf16(fast.MATVEC_ROWS + 1, 64)):
        with pytest.raises(ValueError, match="matvec: x must be bf16"):
            matvec.matvec(x, tiles)
    assert matvec.tile_pack(bf16(60, 64)) is None and matvec.tile_pack(bf16(64, 48)) is None   # not whole tiles
    lib, out = matvec.matvec_lib(), torch.empty(64, dtype=torch.bfloat16)
    x = bf16(1, 64)
    for M, K, N, threads in ((0, 64, 64, 1), (9, 64, 64, 1), (1, 48, 64, 1), (1, 64, 60, 1), (1, 64, 64, 0)):
        assert lib.fd_mv_bf16(x.data_ptr(), M, K, tiles.t.data_ptr(), N, None, out.data_ptr(), threads) == -1


def test_without_avx512_bf16_the_build_is_a_stub_that_says_so(tmp_path):
    so = tmp_path / "matvec_stub.so"
    r = subprocess.run(["cc", "-O2", "-fopenmp", "-fPIC", "-shared", "-mno-avx512bf16", "-o", str(so),
                        os.path.join(HERE, "matvec_cpu.c")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lib = ctypes.CDLL(str(so))
    assert lib.fd_mv_available() == 0
    assert lib.fd_mv_bf16(None, 1, 64, None, 64, None, None, 1) == -1


def torch_norm(h, w, eps):
    """spart.SPart._norm for Llama: RMSNorm in float32, rounded, then times the weight."""
    return torch.nn.functional.rms_norm(h.float(), (h.shape[-1],), None, eps).to(h.dtype) * w


def assert_nearly_bit_equal(ours, theirs, what):
    """At most 1 in 1000 elements differ, each by at most one bf16 step of its value: the same
    roundings, with the norm's sum of squares taken in another order (float64 here, pairwise in torch)."""
    differ = ours != theirs
    step = 2 ** -7 * theirs.float().abs() + 1e-30
    assert differ.float().mean() <= 1e-3, f"{what}: {int(differ.sum())} of {differ.numel()} elements differ"
    assert ((ours.float() - theirs.float()).abs() <= step).all(), f"{what}: an element differs by more than a bf16 step"


@needs_bf16
@pytest.mark.parametrize("T", [1, 3, 8])
def test_llama_halves_equal_the_torch_forward(T):
    """llama_pre and llama_post against spart.py's torch ops (with matvec for the matmuls, held
    to the reference above) on SmolLM2's shapes, activations with outlier channels as real ones have."""
    H, QD, F, N, eps = 576, 576, 1536, 960, 1e-5
    torch.manual_seed(T)
    h = bf16(T, H, scale=3.0)
    h[:, :4] *= 30                                              # a few large channels
    o, norm_w = bf16(T, QD), bf16(H, scale=0.1) + 1
    qkv, out, up, down = (matvec.tile_pack(bf16(n, k, scale=0.05)) for n, k in ((N, H), (H, QD), (2 * F, H), (H, F)))
    pre = matvec.llama_pre(h, norm_w, eps, qkv)
    assert_nearly_bit_equal(pre, matvec.matvec(torch_norm(h, norm_w, eps), qkv), f"llama_pre T {T}")
    h1 = h + matvec.matvec(o, out)
    gate, upx = matvec.matvec(torch_norm(h1, norm_w, eps), up).chunk(2, dim=-1)
    want = h1 + matvec.matvec(torch.nn.functional.silu(gate) * upx, down)
    got = matvec.llama_post(h, o, out, norm_w, eps, up, down)
    assert_nearly_bit_equal(got, want, f"llama_post T {T}")
    with pytest.raises(ValueError, match="llama_post"):
        matvec.llama_post(h, o[:, :64], out, norm_w, eps, up, down)
    with pytest.raises(ValueError, match="llama_post"):         # a down projection of the wrong width
        matvec.llama_post(h, o, out, norm_w, eps, up, matvec.tile_pack(bf16(H + 8, F)))
    for bad_w in (norm_w.float(), norm_w[:64]):                # C would read H bf16 values from it
        with pytest.raises(ValueError, match="the norm's weight"):
            matvec.llama_pre(h, bad_w, eps, qkv)


@needs_bf16
@pytest.mark.parametrize("kind", ["opt-postln-proj", "llama-gqa"])
def test_a_decode_step_with_matvec_equals_one_without(checkpoint, kind):
    """One token through every layer and the head at batch 1 and 3, tiled (matvec_cpu.c) and with
    the tiles taken away (oneDNN): the same within bf16 roundings of the largest logit."""
    d, _ = checkpoint(kind)
    tiled, plain = spart.SPart.load(d, dtype="bfloat16"), spart.SPart.load(d, dtype="bfloat16")
    assert tiled.tiled and tiled.layers[0].up_t is not None and tiled.head_t is not None
    for lw in plain.layers:
        lw.qkv_t = lw.out_t = lw.up_t = lw.down_t = None
    plain.head_t = None
    for T in (1, 3):
        tokens, positions = torch.arange(5, 5 + T), torch.arange(T) + 3
        logits = []
        for sp in (tiled, plain):
            h, rot = sp.embed(tokens, positions), sp.rotary(positions)
            for layer in range(sp.cfg.n_layers):
                q, k, v = sp.pre_attn(layer, h, rot)
                h = sp.post_attn(layer, h, q[:, :, :])     # q stands in for attention's output: same shape
            logits.append(sp.lm_head(h))
        err = (logits[0] - logits[1]).abs().max() / logits[1].abs().max()
        assert err <= 2 ** -5, f"{kind} T {T}: tiled vs oneDNN logits differ by {err:.2e} of the largest"
