"""Fused CPU kernels for the decode step: its attention, and its RMSNorms, each in one pass.

In a decoder-only step, every beam's attention is one softmax over its request's context (scores
from one GEMM, `model.decode.Context`) and its own few positions (its parents' codes and itself).
Spelled out in torch that is six passes over (rows, heads, slots) tensors: the own dot products,
writing them into the score rows, the softmax, its cast back to bf16, and the own positions'
weighted values. At 32 requests x 256 beams those passes cost more than the step's matmuls on a
2-core CPU. This kernel does them in one pass per (row, head), in registers:

    s[r, h, :n]      context scores (masked, from the GEMM)   -> probabilities, in place
    d[r, h, j]       = q[r, h] . k_j[r, h]   (own positions, fp32)
    softmax over [s[r, h, :n], d[r, h, :]]    (fp32, max-subtracted)
    s[r, h, n:]      = 0                      (the own slots: their values are added below)
    own[r, h]        = sum_j p_j * v_j[r, h]

The encoder-decoder step uses the same pass twice: with no context (its self-attention over the
beam's own positions: `self_attention`) and with no own positions (its cross-attention's softmax,
in place: `softmax_`). A position all beams of a request share (the BOS step) is read in place
through a zero beam stride. `rms_norm` is the decoder's gain-less RMSNorm and its cast to the
matmul dtype in one pass (torch takes five: square, mean, rsqrt, multiply, cast).

It is plain C over raw bf16 or fp32 buffers, with fp32 arithmetic (no torch headers: it compiles
in about two seconds), built on first use with the machine's C compiler into
`~/.cache/sidrec/kernels` (or `$SIDREC_KERNEL_CACHE`), keyed by its source, flags and CPU, and
called through ctypes. An image has no compiler at run time: its build stage runs
`python -m sidrec.kernels.cpu_fused --build --out DIR` (a portable build, no -march=native, since
the image runs on CPUs other than the builder's) and sets SIDREC_KERNEL_DIR=DIR; a build there
that matches this source is loaded without any compiler. Its OpenMP loop runs on torch's own OpenMP runtime (the library resolves
to the libgomp torch already loaded) with torch's thread count. Where there is no compiler, or
the build fails, `available()` is False and the decoder keeps the torch ops: the kernel is an
optimisation, never a requirement. SIDREC_CPU_KERNELS=0 turns it off. tests/test_cpu_fused.py
holds it to torch, alone and inside a beam search.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("sidrec.kernels")

# The kernel's per-thread buffers are sized by these bounds; the C source gets them from here
# (one definition: `supports` and `attention` check the same numbers).
MAX_OWN, MAX_DH, MAX_S = 8, 256, 4096

_SOURCE = f"#define MAX_OWN {MAX_OWN}\n#define MAX_DH {MAX_DH}\n#define MAX_S {MAX_S}\n" + r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

static inline float bf2f(uint16_t x) { uint32_t u = (uint32_t)x << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {  /* round to nearest even; inputs are finite here */
    uint32_t u; memcpy(&u, &f, 4); u += 0x7FFFu + ((u >> 16) & 1u); return (uint16_t)(u >> 16);
}

/* exp(x) for x <= 0 to 1e-5 relative: 2^t as 2^floor(t) (exponent bits) x a degree-6 polynomial
   of the fraction. Branch-free, so the loops over it vectorise (libm's expf does not); -inf and
   anything below -87 come out as exactly 0. */
static inline float exp_neg(float x) {
    const float xc = x < -87.f ? -87.f : x;
    const float t = xc * 1.4426950408889634f;
    const float fi = __builtin_floorf(t);
    const float f = t - fi;
    float p = 1.5353362e-4f;
    p = p * f + 1.3398874e-3f;
    p = p * f + 9.6180160e-3f;
    p = p * f + 5.5503406e-2f;
    p = p * f + 2.4022657e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)fi + 127) << 23;  /* fi >= -126: a normal power of two */
    float scale; memcpy(&scale, &bits, 4);
    return x < -87.f ? 0.f : p * scale;
}


static inline float f32_load(float x) { return x; }
static inline float f32_store(float x) { return x; }

/* B requests x K beams x H heads. Every operand is addressed as base + b * sb + k * sk + h * hs:
   s (scores, head stride S), q, ks[j], vs[j] (head stride dh); sk = 0 for a position all beams of a
   request share. own (B, K, H, dh) is dense. S = 0: no context (s unused); n_own = 0: no own
   positions (q, ks, vs, own unused). T is the element type (bf16 as uint16_t, or float); all
   arithmetic is in float. nthreads: the caller's torch thread count (a thread other than the one
   that set it would otherwise get OpenMP's default, every core). A row with nothing to attend to
   (all context masked, no own positions) gets all-zero probabilities. */
#define OWN_ATTENTION(NAME, T, LOAD, STORE)                                                       \
void NAME(int64_t B, int64_t K, int64_t H, int64_t S, int64_t n, int64_t n_own, int64_t dh,       \
          T *s, int64_t s_sb, int64_t s_sk, const T *q, int64_t q_sb, int64_t q_sk,               \
          const T *const *ks, const int64_t *k_sb, const int64_t *k_sk,                          \
          const T *const *vs, const int64_t *v_sb, const int64_t *v_sk, T *own, int nthreads) {  \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                            \
    for (int64_t bkh = 0; bkh < B * K * H; bkh++) {                                               \
        const int64_t h = bkh % H, bk = bkh / H, k = bk % K, b = bk / K;                          \
        T *sp = S ? s + b * s_sb + k * s_sk + h * S : 0;                                          \
        float qf[MAX_DH], d[MAX_OWN], e[MAX_S], acc[MAX_DH];                                      \
        float m = -INFINITY;                                                                      \
        if (n_own) {                                                                              \
            const T *qp = q + b * q_sb + k * q_sk + h * dh;                                       \
            for (int64_t t = 0; t < dh; t++) qf[t] = LOAD(qp[t]);                                 \
        }                                                                                         \
        for (int64_t j = 0; j < n_own; j++) {                                                     \
            const T *kp = ks[j] + b * k_sb[j] + k * k_sk[j] + h * dh;                             \
            float a = 0.f;                                                                        \
            _Pragma("omp simd reduction(+:a)")                                                    \
            for (int64_t t = 0; t < dh; t++) a += qf[t] * LOAD(kp[t]);                            \
            d[j] = a;                                                                             \
            m = a > m ? a : m;                                                                    \
        }                                                                                         \
        _Pragma("omp simd reduction(max:m)")                                                      \
        for (int64_t t = 0; t < n; t++) { e[t] = LOAD(sp[t]); m = e[t] > m ? e[t] : m; }         \
        if (m == -INFINITY) m = 0.f;  /* nothing to attend to: every weight below comes out 0 */  \
        float z = 0.f;                                                                            \
        _Pragma("omp simd reduction(+:z)")                                                        \
        for (int64_t t = 0; t < n; t++) { e[t] = exp_neg(e[t] - m); z += e[t]; }                  \
        for (int64_t j = 0; j < n_own; j++) { d[j] = exp_neg(d[j] - m); z += d[j]; }              \
        const float inv = z > 0.f ? 1.f / z : 0.f;                                                \
        for (int64_t t = 0; t < n; t++) sp[t] = STORE(e[t] * inv);                                \
        for (int64_t t = n; t < S; t++) sp[t] = 0;                                                \
        if (!n_own) continue;                                                                     \
        for (int64_t t = 0; t < dh; t++) acc[t] = 0.f;                                            \
        for (int64_t j = 0; j < n_own; j++) {                                                     \
            const float p = LOAD(STORE(d[j] * inv));  /* as the probability is stored */          \
            const T *vp = vs[j] + b * v_sb[j] + k * v_sk[j] + h * dh;                             \
            _Pragma("omp simd")                                                                   \
            for (int64_t t = 0; t < dh; t++) acc[t] += p * LOAD(vp[t]);                           \
        }                                                                                         \
        T *op = own + bkh * dh;                                                                   \
        for (int64_t t = 0; t < dh; t++) op[t] = STORE(acc[t]);                                   \
    }                                                                                             \
}

OWN_ATTENTION(sidrec_own_attention_bf16, uint16_t, bf2f, f2bf)
OWN_ATTENTION(sidrec_own_attention_f32, float, f32_load, f32_store)

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps), rows of fp32 x (row stride x_rs) into dense T rows:
   RMSNorm without its gain (the decoder folds the gain into the next projection), cast to the
   matmul dtype in the same pass. */
#define RMS_NORM(NAME, T, STORE)                                                                  \
void NAME(const float *x, int64_t R, int64_t D, int64_t x_rs, float eps, T *out, int nthreads) {  \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                            \
    for (int64_t r = 0; r < R; r++) {                                                             \
        const float *xp = x + r * x_rs;                                                           \
        float ss = 0.f;                                                                           \
        _Pragma("omp simd reduction(+:ss)")                                                       \
        for (int64_t t = 0; t < D; t++) ss += xp[t] * xp[t];                                      \
        const float inv = 1.f / sqrtf(ss / (float)D + eps);                                       \
        T *op = out + r * D;                                                                      \
        _Pragma("omp simd")                                                                       \
        for (int64_t t = 0; t < D; t++) op[t] = STORE(xp[t] * inv);                               \
    }                                                                                             \
}

RMS_NORM(sidrec_rms_norm_bf16, uint16_t, f2bf)
RMS_NORM(sidrec_rms_norm_f32, float, f32_store)
"""
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math"]
if platform.machine() in ("x86_64", "AMD64"):
    # 256-bit vectors: these loops run 16-64 elements; 512-bit ones measured slower on an AVX-512 Xeon.
    _FLAGS.insert(2, "-mprefer-vector-width=256")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_key() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in info.splitlines() if ln.startswith(("flags", "Features"))), "")  # x86 | arm
    except OSError:
        flags = ""
    return f"{platform.machine()}|{flags}"


def _cache_dir() -> Path:
    return Path(os.environ.get("SIDREC_KERNEL_CACHE") or Path.home() / ".cache" / "sidrec" / "kernels")


def _portable(flags: list[str]) -> list[str]:
    return [f for f in flags if not f.startswith(("-march", "-mprefer"))]


def prebuilt_name() -> str:
    """File name of the portable build of this source and flags: what `--build` writes and what
    SIDREC_KERNEL_DIR is searched for (a .so of another source is never picked up)."""
    key = hashlib.sha256("\n".join([_SOURCE, " ".join(_portable(_FLAGS)), platform.machine()]).encode())
    return f"cpu_fused-portable-{key.hexdigest()[:16]}.so"


class BuildError(RuntimeError):
    """The C compiler is missing or failed (the message holds its last lines of output)."""


def _compile(cc: str, flags: list[str], out: Path) -> None:
    """Compile the source into `out`, atomically (a concurrent builder leaves one complete file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, so = Path(tmp) / "k.c", Path(tmp) / "k.so"
        src.write_text(_SOURCE)
        res = subprocess.run([cc, *flags, str(src), "-o", str(so), "-lm"], capture_output=True, text=True,
                             timeout=120)
        if res.returncode != 0:
            raise BuildError(f"{cc} failed: {res.stderr.strip()[-500:]}")
        os.replace(so, out)


def build(out_dir: str | Path, cc: str | None = None) -> Path:
    """The build-time path (the image's build stage): a portable build into out_dir, named by
    `prebuilt_name()`. Portable: no -march=native, so the .so runs on any CPU of this
    architecture, not only the build machine's. Raises BuildError without a working compiler."""
    cc = cc or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BuildError("no C compiler found (set CC or install gcc)")
    out = Path(out_dir) / prebuilt_name()
    _compile(cc, _portable(_FLAGS), out)
    _load(out)  # it links and exports every symbol, or this raises here rather than at serve time
    return out


def _prebuilt() -> Path | None:
    """The portable build in SIDREC_KERNEL_DIR (set by the image), if there is one for this source."""
    d = os.environ.get("SIDREC_KERNEL_DIR")
    if not d:
        return None
    p = Path(d) / prebuilt_name()
    if p.is_file():
        return p
    log.warning("SIDREC_KERNEL_DIR=%s holds no %s (built from another source?); building on first use", d, p.name)
    return None


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for fn in (lib.sidrec_own_attention_bf16, lib.sidrec_own_attention_f32):
        fn.argtypes = [i64] * 7 + [ptr, i64, i64, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
        fn.restype = None
    for fn in (lib.sidrec_rms_norm_bf16, lib.sidrec_rms_norm_f32):
        fn.argtypes = [ptr, i64, i64, i64, ctypes.c_float, ptr, ctypes.c_int]
        fn.restype = None
    return lib


def _build() -> ctypes.CDLL | None:
    prebuilt = _prebuilt()
    if prebuilt is not None:
        return _load(prebuilt)  # no compiler needed: the runtime image has none
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler found: the decoder uses torch ops instead of its fused CPU kernels")
        return None
    cpu = _cpu_key()
    # -march=native code is only cached under the CPU features it was built for: where they cannot
    # be read, a portable build (a .so for another CPU would die on an illegal instruction).
    flags = _FLAGS if cpu.partition("|")[2] else _portable(_FLAGS)
    key = hashlib.sha256("\n".join([_SOURCE, " ".join(flags), cpu]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"cpu_fused-{key}.so"
    if not out.is_file():
        try:
            _compile(cc, flags, out)
        except BuildError as e:
            log.warning("the fused CPU kernels did not build (%s); using torch ops: %s", cc, e)
            return None
    return _load(out)


def available() -> bool:
    """Whether the kernels are built (building them on first call) and not switched off."""
    global _lib, _tried
    if os.environ.get("SIDREC_CPU_KERNELS", "1") == "0":
        return False
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _lib = _build()
                except (OSError, AttributeError, subprocess.SubprocessError) as e:  # a .so missing a symbol
                    log.warning("the fused CPU kernels are unavailable (%s); using torch ops", e)
                    _lib = None
                _tried = True
    return _lib is not None


def supports(s: Tensor | None, q: Tensor, n_own: int) -> bool:
    """Whether `attention` takes these operands (else the caller spells the step out): CPU tensors
    of one supported dtype, within the kernel's fixed bounds, and the kernel built."""
    t = q if s is None else s
    return (t.device.type == "cpu" and t.dtype in _FUNCTIONS and q.dtype == t.dtype and n_own <= MAX_OWN
            and q.shape[-1] <= MAX_DH and (s is None or s.shape[-1] <= MAX_S) and available())


_FUNCTIONS = {torch.bfloat16: "sidrec_own_attention_bf16", torch.float32: "sidrec_own_attention_f32"}


def _strides(t: Tensor, inner: int) -> tuple[Tensor, int, int]:
    """t (B, K or 1, H, inner) -> (t or a dense copy, its request stride, its beam stride): heads
    must be `inner` apart and dense; a position shared by a request's beams (K = 1) gets beam
    stride 0, so it is read in place, never copied per beam."""
    st = t.stride()
    if st[-1] != 1 or st[-2] != inner:
        t = t.contiguous()
        st = t.stride()
    return t, st[0], (0 if t.shape[1] == 1 else st[1])


def attention(s: Tensor | None, n: int, q: Tensor, own_k: list[Tensor], own_v: list[Tensor]) -> Tensor | None:
    """One softmax per (request, beam, head) over context scores and the beam's own positions.

    s (B, K, H, S) context scores or None (no context): in place, s[..., :n] become the context
    probabilities and s[..., n:] zero (the own slots; their values come back in the result).
    q (B, K, H, dh); own_k/own_v: lists of (B, K or 1, H, dh), in order (may be empty: then the
    call is a softmax of s in place). All one dtype, bf16 or fp32. Returns sum_j p_j v_j
    (B, K, H, dh) in that dtype, or None without own positions."""
    # The C side trusts every shape and stride it is given: check them all here.
    if q.dim() != 4 or (s is not None and s.dim() != 4):
        raise ValueError(f"attention needs 4-d queries and scores, got {tuple(q.shape)} and "
                         f"{None if s is None else tuple(s.shape)}")
    B, K, H, dh = q.shape
    S = 0 if s is None else s.shape[-1]
    if (s is not None and tuple(s.shape[:3]) != (B, K, H)) or not 0 <= n <= S or S > MAX_S or dh > MAX_DH:
        raise ValueError(f"attention: queries {tuple(q.shape)} do not fit scores "
                         f"{None if s is None else tuple(s.shape)} with n = {n} (S <= {MAX_S}, dh <= {MAX_DH})")
    if len(own_k) != len(own_v) or len(own_k) > MAX_OWN or (s is None and not own_k) or any(
            t.dim() != 4 or t.shape[0] != B or t.shape[1] not in (1, K) or tuple(t.shape[2:]) != (H, dh)
            for t in own_k + own_v):
        raise ValueError(f"attention needs up to {MAX_OWN} own keys and as many values, each (B, K or 1, H, dh) "
                         f"= ({B}, {K} or 1, {H}, {dh}), and scores or own positions")
    tensors = [q, *own_k, *own_v] + ([] if s is None else [s])
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("attention runs on CPU tensors only")
    if len({t.dtype for t in tensors}) != 1 or q.dtype not in _FUNCTIONS:
        raise ValueError("attention needs scores, queries, keys and values of one dtype, bf16 or fp32")
    if s is not None and (s.stride(-1) != 1 or s.stride(-2) != S):
        raise ValueError("attention needs score rows with dense heads (it writes them in place)")
    if not available():
        raise RuntimeError("the fused CPU kernels are not available (see kernels.cpu_fused.available)")
    m = len(own_k)
    if m:  # without own positions q is only the shape's carrier: not read
        q, q_sb, q_sk = _strides(q, dh)
        ks, k_sb, k_sk = zip(*(_strides(t, dh) for t in own_k))
        vs, v_sb, v_sk = zip(*(_strides(t, dh) for t in own_v))
    else:
        q_sb = q_sk = 0
        ks = k_sb = k_sk = vs = v_sb = v_sk = ()
    out = torch.empty(B, K, H, dh, dtype=q.dtype) if m else None
    s_sb, s_sk = (0, 0) if s is None else (s.stride(0), 0 if s.shape[1] == 1 else s.stride(1))

    def arr(kind, xs):
        return (kind * max(m, 1))(*xs)
    getattr(_lib, _FUNCTIONS[q.dtype])(
        B, K, H, S, n, m, dh, None if s is None else s.data_ptr(), s_sb, s_sk, q.data_ptr(), q_sb, q_sk,
        arr(ctypes.c_void_p, [t.data_ptr() for t in ks]), arr(ctypes.c_int64, k_sb), arr(ctypes.c_int64, k_sk),
        arr(ctypes.c_void_p, [t.data_ptr() for t in vs]), arr(ctypes.c_int64, v_sb), arr(ctypes.c_int64, v_sk),
        None if out is None else out.data_ptr(), torch.get_num_threads())
    return out


def own_attention(s: Tensor, n: int, q: Tensor, own_k: list[Tensor], own_v: list[Tensor]) -> Tensor:
    """The decoder-only step: context scores and own positions in one softmax (see `attention`)."""
    if not own_k:
        raise ValueError("own_attention needs at least one own position (this step's)")
    return attention(s, n, q, own_k, own_v)


def self_attention(q: Tensor, own_k: list[Tensor], own_v: list[Tensor]) -> Tensor:
    """The encoder-decoder step's self-attention: over the beam's own positions only."""
    return attention(None, 0, q, own_k, own_v)


def softmax_(s: Tensor) -> Tensor:
    """In place: s (B, K, H, S) scores -> probabilities over the last dim, in s's dtype (the
    encoder-decoder step's cross-attention). Returns s."""
    attention(s, s.shape[-1], s[..., :0], [], [])  # no own positions: the query only carries the shape
    return s


_NORMS = {torch.bfloat16: "sidrec_rms_norm_bf16", torch.float32: "sidrec_rms_norm_f32"}


def rms_norm_supports(x: Tensor, dtype: torch.dtype) -> bool:
    """Whether `rms_norm` takes x: an fp32 CPU tensor with dense rows, out to bf16 or fp32."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and dtype in _NORMS and x.dim() >= 1
            and x.stride(-1) == 1 and x.numel() > 0 and available())


def rms_norm(x: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """RMSNorm without gain over the last dim of fp32 x, written in `dtype` (one pass; equals
    F.rms_norm(x, (D,), None, eps).to(dtype) up to fp32 summation order)."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and dtype in _NORMS and x.dim() >= 1
            and x.stride(-1) == 1 and x.numel() > 0):
        raise ValueError(f"rms_norm needs an fp32 CPU tensor with dense rows and bf16/fp32 out, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device} -> {dtype}")
    if not available():
        raise RuntimeError("the fused CPU kernels are not available (see kernels.cpu_fused.available)")
    D = x.shape[-1]
    rows = x.reshape(-1, D)  # a view wherever the rows are evenly spaced, else a copy
    out = torch.empty(x.shape, dtype=dtype)
    getattr(_lib, _NORMS[dtype])(rows.data_ptr(), rows.shape[0], D, rows.stride(0), eps, out.data_ptr(),
                                 torch.get_num_threads())
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m sidrec.kernels.cpu_fused --build --out DIR`: the image's build stage."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m sidrec.kernels.cpu_fused",
                                description="build the fused CPU kernels ahead of time (portable, no -march=native)")
    p.add_argument("--build", action="store_true", required=True, help="compile the kernels")
    p.add_argument("--out", required=True, help="directory to write the .so into (then set SIDREC_KERNEL_DIR to it)")
    args = p.parse_args(argv)
    try:
        path = build(args.out)
    except (BuildError, OSError, subprocess.SubprocessError) as e:
        print(f"cpu_fused: build failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"built": str(path), "portable": True, "machine": platform.machine()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
