"""The fused CPU kernels (kernels/cpu_fused.py) against torch, and their fallback.

The kernel is built with the machine's C compiler on first use. Where there is none, the tests
that need it are skipped with that reason (the decoder then runs its torch ops, which
tests/test_decoding.py covers); the fallback test runs everywhere.
"""
from __future__ import annotations

import logging

import pytest
import torch

from sidrec.kernels import cpu_fused

needs_kernel = pytest.mark.skipif(not cpu_fused.available(),
                                  reason="no C compiler here: the fused CPU kernels are unavailable")


def reference(s: torch.Tensor, n: int, q, own_k, own_v) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 softmax over [s[..., :n], q . k_j] -> (context probabilities, sum_j p_j v_j)."""
    d = torch.stack([(q.float() * k.float()).sum(-1) for k in own_k], -1)
    p = torch.softmax(torch.cat([s[..., :n].float(), d], -1), -1)
    own = sum(p[..., n + j, None] * v.float() for j, v in enumerate(own_v))
    return p[..., :n], own


def operands(B: int, K: int, H: int, dh: int, n: int, slots: int, n_own: int, seed: int,
             dtype: torch.dtype = torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    bf = dtype
    s = (torch.randn(B, K, H * (n + slots), generator=g) * 3).to(bf).unflatten(-1, (H, n + slots))
    s[..., : n // 3] = float("-inf")  # masked (left-padded) history positions
    qkv = (torch.randn(B, K, 3 * H * dh, generator=g) * 0.5).to(bf)
    q, k, v = (t.unflatten(-1, (H, dh)) for t in qkv.split(H * dh, -1))  # strided views, as the decoder has
    own_k, own_v = [], []
    for j in range(n_own - 1):
        rows = 1 if j == 0 else K  # a position shared by all beams of a request, then per-beam ones
        own_k.append((torch.randn(B, rows, H, dh, generator=g) * 0.5).to(bf))
        own_v.append((torch.randn(B, rows, H, dh, generator=g)).to(bf))
    return s, q, own_k + [k], own_v + [v]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("B,K,H,dh,n,slots,n_own", [(1, 1, 1, 8, 5, 1, 1), (3, 7, 2, 16, 9, 3, 2),
                                                     (2, 33, 6, 64, 61, 2, 3), (4, 5, 3, 24, 1, 4, 4)])
def test_kernel_matches_torch(B, K, H, dh, n, slots, n_own, dtype):
    s, q, own_k, own_v = operands(B, K, H, dh, n, slots, n_own, seed=B * 100 + K, dtype=dtype)
    p_ref, own_ref = reference(s, n, q, own_k, own_v)
    masked = torch.isneginf(s[..., :n])
    got = cpu_fused.own_attention(s, n, q, own_k, own_v)
    assert got.dtype == dtype and got.shape == (B, K, H, dh)
    tol = 4e-3 if dtype == torch.bfloat16 else 1e-5  # bf16 rounding; fp32: the kernel's exp (1e-5)
    torch.testing.assert_close(s[..., :n].float(), p_ref, rtol=0, atol=tol)
    assert (s[..., :n][masked] == 0).all()  # masked positions get exactly nothing
    assert (s[..., n:] == 0).all()  # the own slots: their values come back in `got`
    torch.testing.assert_close(got.float(), own_ref, rtol=5 * tol, atol=5 * tol)


@needs_kernel
def test_kernel_rejects_shapes_it_would_read_past():
    s, q, own_k, own_v = operands(2, 4, 2, 8, 5, 1, 2, seed=0)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_fused.own_attention(s, 5, q[:, :3], own_k, own_v)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_fused.own_attention(s, 7, q, own_k, own_v)  # n past the score rows
    with pytest.raises(ValueError, match="own keys"):
        cpu_fused.own_attention(s, 5, q, own_k, own_v[:1])
    with pytest.raises(ValueError, match="own keys"):
        cpu_fused.own_attention(s, 5, q, [own_k[0], own_k[1][:, :, :, :4]], own_v)


@needs_kernel
def test_kernel_rejects_mixed_dtypes():
    s, q, own_k, own_v = operands(2, 4, 2, 8, 5, 1, 2, seed=0)
    with pytest.raises(ValueError, match="one dtype"):
        cpu_fused.own_attention(s, 5, q, [own_k[0].float(), own_k[1]], own_v)


@needs_kernel
def test_kernel_rejects_score_rows_it_cannot_address():
    s, q, own_k, own_v = operands(2, 4, 2, 8, 5, 1, 1, seed=0)
    padded = torch.zeros(*s.shape[:3], s.shape[3] + 3, dtype=s.dtype)[..., : s.shape[3]]  # heads 3 apart
    padded.copy_(s)
    with pytest.raises(ValueError, match="dense heads"):
        cpu_fused.own_attention(padded, 5, q, own_k, own_v)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_self_attention_and_softmax_match_torch(dtype):
    """The encoder-decoder step's two uses: attention over own positions only (one of them shared
    by all beams, read in place), and a softmax of context scores in place."""
    s, q, own_k, own_v = operands(3, 5, 2, 16, 9, 0, 3, seed=7, dtype=dtype)
    got = cpu_fused.self_attention(q, own_k, own_v)
    _, own_ref = reference(s[..., :0], 0, q, own_k, own_v)
    tol = 4e-3 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), own_ref, rtol=5 * tol, atol=5 * tol)
    s[1, 2] = float("-inf")  # a request/beam with every context position masked: all zeros, not NaN
    ref = torch.softmax(s.float(), -1).nan_to_num(0.0)
    out = cpu_fused.softmax_(s)
    assert out is s and s.dtype == dtype
    torch.testing.assert_close(s.float(), ref, rtol=0, atol=tol)
    assert (s[1, 2] == 0).all()


@needs_kernel
@pytest.mark.parametrize("arch", ["decoder_only", "encoder_decoder"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_beam_search_agrees_with_and_without_kernel(monkeypatch, dtype, arch):
    """A beam search (absorbed context, the kernel's paths) gives the same scores, within bf16
    rounding (fp32: 1e-4), and the same beams, with the kernel and with torch ops."""
    import sidrec.model.decode as decode
    from sidrec.model.beam_search import beam_search, encode_histories
    from test_decoding import make_catalogue, make_model

    from sidrec.kernels.trie import PrefixTrie

    monkeypatch.setattr(decode, "ABSORB_MIN_BEAMS", 1)
    model = make_model(arch, seed=3, scale=1.0)
    sid_map = make_catalogue(60, seed=3)
    trie = PrefixTrie.build(sid_map, model.cards)
    src, mask = encode_histories([[1, 2, 3], [4], [], [5, 6, 7, 8, 9, 10, 11]], sid_map, model.offsets,
                                 model.cfg.max_history)
    calls = []
    real = cpu_fused.attention
    monkeypatch.setattr(cpu_fused, "attention", lambda *a: calls.append(1) or real(*a))
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("SIDREC_CPU_KERNELS", flag)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out[flag] = beam_search(model, trie, src, mask, 12, 6)
    assert calls, "the kernel was not used"
    a, b = out["0"], out["1"]
    if dtype == torch.float32:
        torch.testing.assert_close(b.scores, a.scores, rtol=1e-4, atol=1e-4)
        assert torch.equal(a.items, b.items)
        return
    torch.testing.assert_close(b.scores, a.scores, rtol=2e-2, atol=3e-2)
    overlap = sum(len(set(x) & set(y)) for x, y in zip(a.items.tolist(), b.items.tolist()))
    assert overlap >= 0.9 * a.items.numel()


def test_no_compiler_means_torch_ops(monkeypatch, tmp_path, caplog):
    """A failed build (here: a compiler that always fails) leaves the kernel off with a warning,
    and decoding still works through the torch ops."""
    monkeypatch.setattr(cpu_fused, "_lib", None)
    monkeypatch.setattr(cpu_fused, "_tried", False)
    monkeypatch.setenv("SIDREC_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    with caplog.at_level(logging.WARNING, logger="sidrec.kernels"):
        assert not cpu_fused.available()
    assert "did not build" in caplog.text
    s, q, own_k, own_v = operands(1, 2, 1, 8, 3, 1, 1, seed=0)
    assert not cpu_fused.supports(s, q, 1)
    assert not list(tmp_path.glob("*.so"))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_rms_norm_matches_torch(dtype):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 9, 40, generator=g) * 5
    for t in (x, x[:, 2:7], x[1], x[:, :, None, :].expand(3, 9, 2, 40)):  # dense, sliced, 2-d, broadcast rows
        got = cpu_fused.rms_norm(t, 1e-6, dtype)
        ref = F.rms_norm(t, (40,), None, 1e-6)
        assert got.dtype == dtype and got.shape == t.shape
        torch.testing.assert_close(got.float(), ref.to(dtype).float(), rtol=8e-3 if dtype == torch.bfloat16 else 1e-6,
                                   atol=1e-6)
    with pytest.raises(ValueError, match="fp32 CPU tensor"):
        cpu_fused.rms_norm(x.to(torch.bfloat16), 1e-6, dtype)
    with pytest.raises(ValueError, match="dense rows"):
        cpu_fused.rms_norm(x.transpose(1, 2), 1e-6, dtype)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("SIDREC_CPU_KERNELS", "0")
    assert not cpu_fused.available()


def test_prebuilt_kernels_load_without_a_compiler(monkeypatch, tmp_path):
    """The image's path: `python -m sidrec.kernels.cpu_fused --build --out DIR` at build time (a
    portable build), then at run time SIDREC_KERNEL_DIR=DIR is loaded with no compiler at all (CC
    a failing program, and any compiler call an error), and computes what torch does."""
    import subprocess
    import sys

    prebuilt = tmp_path / "prebuilt"
    proc = subprocess.run([sys.executable, "-m", "sidrec.kernels.cpu_fused", "--build", "--out", str(prebuilt)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "no C compiler" in proc.stderr:
        pytest.skip("no C compiler here: the build-time path cannot be exercised")
    assert proc.returncode == 0, proc.stderr
    [so] = prebuilt.glob("*.so")
    assert so.name == cpu_fused.prebuilt_name() and "-march" not in " ".join(cpu_fused._portable(cpu_fused._FLAGS))

    cache = tmp_path / "cache"
    monkeypatch.setattr(cpu_fused, "_lib", None)
    monkeypatch.setattr(cpu_fused, "_tried", False)
    monkeypatch.setenv("SIDREC_KERNEL_DIR", str(prebuilt))
    monkeypatch.setenv("SIDREC_KERNEL_CACHE", str(cache))
    monkeypatch.setenv("CC", "false")

    def no_compiler(*a, **k):
        raise AssertionError(f"the compiler was invoked: {a}")
    monkeypatch.setattr(cpu_fused.subprocess, "run", no_compiler)
    assert cpu_fused.available()
    assert not cache.exists()  # nothing built at run time
    s, q, own_k, own_v = operands(2, 3, 2, 16, 7, 2, 2, seed=5, dtype=torch.float32)
    p_ref, own_ref = reference(s, 7, q, own_k, own_v)
    got = cpu_fused.own_attention(s, 7, q, own_k, own_v)
    torch.testing.assert_close(s[..., :7], p_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, own_ref, rtol=5e-5, atol=5e-5)


def test_kernel_dir_without_a_matching_build_falls_back(monkeypatch, tmp_path, caplog):
    """A SIDREC_KERNEL_DIR holding no build of this source (e.g. an image built from other code),
    and no compiler: a warning names the missing file, and the decoder keeps the torch ops."""
    (tmp_path / "cpu_fused-portable-0000000000000000.so").write_bytes(b"not this source's build")
    monkeypatch.setattr(cpu_fused, "_lib", None)
    monkeypatch.setattr(cpu_fused, "_tried", False)
    monkeypatch.setenv("SIDREC_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("SIDREC_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "false")
    with caplog.at_level(logging.WARNING, logger="sidrec.kernels"):
        assert not cpu_fused.available()
    assert cpu_fused.prebuilt_name() in caplog.text and "did not build" in caplog.text
