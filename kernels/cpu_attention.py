"""A fused CPU kernel for the wide decode step's attention: one pass instead of six tensor ops.

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

It is plain C over raw bf16 or fp32 buffers, with fp32 arithmetic (no torch headers: it compiles
in about two seconds), built on first use with the machine's C compiler into
`~/.cache/sidrec/kernels` (or `$SIDREC_KERNEL_CACHE`), keyed by its source, flags and CPU, and
called through ctypes. Its OpenMP loop runs on torch's own OpenMP runtime (the library resolves
to the libgomp torch already loaded) with torch's thread count. Where there is no compiler, or
the build fails, `available()` is False and the decoder keeps the torch ops: the kernel is an
optimisation, never a requirement. SIDREC_CPU_KERNELS=0 turns it off. tests/test_cpu_attention.py
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
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("sidrec.kernels")

_SOURCE = r"""
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

#define MAX_OWN 8
#define MAX_DH 256
#define MAX_S 4096

static inline float f32_load(float x) { return x; }
static inline float f32_store(float x) { return x; }

/* rows R, heads H; s: (R, H, S) with row stride s_rs and head stride S; q: (R, H, dh), row stride
   q_rs, head stride dh; ks[j]/vs[j]: (R, H, dh), row strides k_rs[j]/v_rs[j]; own: (R, H, dh)
   contiguous. T is the element type (bf16 as uint16_t, or float); all arithmetic is in float.
   nthreads: the caller's torch thread count (a thread other than the one that set it would
   otherwise get OpenMP's default, every core). */
#define OWN_ATTENTION(NAME, T, LOAD, STORE)                                                       \
void NAME(int64_t R, int64_t H, int64_t S, int64_t n, int64_t n_own, int64_t dh,                  \
          T *s, int64_t s_rs, const T *q, int64_t q_rs, const T *const *ks, const int64_t *k_rs,  \
          const T *const *vs, const int64_t *v_rs, T *own, int nthreads) {                        \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                            \
    for (int64_t rh = 0; rh < R * H; rh++) {                                                      \
        const int64_t r = rh / H, h = rh % H;                                                     \
        T *sp = s + r * s_rs + h * S;                                                             \
        const T *qp = q + r * q_rs + h * dh;                                                      \
        float qf[MAX_DH], d[MAX_OWN], e[MAX_S], acc[MAX_DH];                                      \
        for (int64_t t = 0; t < dh; t++) qf[t] = LOAD(qp[t]);                                     \
        float m = -INFINITY;                                                                      \
        for (int64_t j = 0; j < n_own; j++) {                                                     \
            const T *kp = ks[j] + r * k_rs[j] + h * dh;                                           \
            float a = 0.f;                                                                        \
            _Pragma("omp simd reduction(+:a)")                                                    \
            for (int64_t t = 0; t < dh; t++) a += qf[t] * LOAD(kp[t]);                            \
            d[j] = a;                                                                             \
            m = a > m ? a : m;                                                                    \
        }                                                                                         \
        _Pragma("omp simd reduction(max:m)")                                                      \
        for (int64_t t = 0; t < n; t++) { e[t] = LOAD(sp[t]); m = e[t] > m ? e[t] : m; }         \
        float z = 0.f;                                                                            \
        _Pragma("omp simd reduction(+:z)")                                                        \
        for (int64_t t = 0; t < n; t++) { e[t] = exp_neg(e[t] - m); z += e[t]; }                  \
        for (int64_t j = 0; j < n_own; j++) { d[j] = exp_neg(d[j] - m); z += d[j]; }              \
        const float inv = 1.f / z;                                                                \
        for (int64_t t = 0; t < n; t++) sp[t] = STORE(e[t] * inv);                                \
        for (int64_t t = n; t < S; t++) sp[t] = 0;                                                \
        for (int64_t t = 0; t < dh; t++) acc[t] = 0.f;                                            \
        for (int64_t j = 0; j < n_own; j++) {                                                     \
            const float p = LOAD(STORE(d[j] * inv));  /* as the probability is stored */          \
            const T *vp = vs[j] + r * v_rs[j] + h * dh;                                           \
            _Pragma("omp simd")                                                                   \
            for (int64_t t = 0; t < dh; t++) acc[t] += p * LOAD(vp[t]);                           \
        }                                                                                         \
        T *op = own + rh * dh;                                                                    \
        for (int64_t t = 0; t < dh; t++) op[t] = STORE(acc[t]);                                   \
    }                                                                                             \
}

OWN_ATTENTION(sidrec_own_attention_bf16, uint16_t, bf2f, f2bf)
OWN_ATTENTION(sidrec_own_attention_f32, float, f32_load, f32_store)
"""
MAX_OWN, MAX_DH, MAX_S = 8, 256, 4096
_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=256", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_key() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}|{flags}"


def _cache_dir() -> Path:
    return Path(os.environ.get("SIDREC_KERNEL_CACHE") or Path.home() / ".cache" / "sidrec" / "kernels")


def _build() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler found: the decoder uses torch ops for its attention")
        return None
    key = hashlib.sha256("\n".join([_SOURCE, " ".join(_FLAGS), _cpu_key()]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"own_attention-{key}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            src, so = Path(tmp) / "k.c", Path(tmp) / "k.so"
            src.write_text(_SOURCE)
            res = subprocess.run([cc, *_FLAGS, str(src), "-o", str(so), "-lm"], capture_output=True, text=True,
                                 timeout=120)
            if res.returncode != 0:
                log.warning("the fused CPU attention kernel did not build (%s); using torch ops: %s", cc,
                            res.stderr.strip()[-500:])
                return None
            os.replace(so, out)  # atomic: a concurrent builder leaves one complete file
    lib = ctypes.CDLL(str(out))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for fn in (lib.sidrec_own_attention_bf16, lib.sidrec_own_attention_f32):
        fn.argtypes = [i64, i64, i64, i64, i64, i64, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
        fn.restype = None
    return lib


def available() -> bool:
    """Whether the kernel is built (building it on first call) and not switched off."""
    global _lib, _tried
    if os.environ.get("SIDREC_CPU_KERNELS", "1") == "0":
        return False
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _lib = _build()
                except (OSError, subprocess.SubprocessError) as e:
                    log.warning("the fused CPU attention kernel is unavailable (%s); using torch ops", e)
                    _lib = None
                _tried = True
    return _lib is not None


def supports(s: Tensor, q: Tensor, n_own: int) -> bool:
    """Whether `own_attention` takes these operands (else the caller spells the step out)."""
    return (s.device.type == "cpu" and s.dtype in _FUNCTIONS and q.dtype == s.dtype
            and 0 < n_own <= MAX_OWN and q.shape[-1] <= MAX_DH and s.shape[-1] <= MAX_S and available())


_FUNCTIONS = {torch.bfloat16: "sidrec_own_attention_bf16", torch.float32: "sidrec_own_attention_f32"}


def _rows(t: Tensor, R: int, H: int, dh: int) -> tuple[Tensor, int]:
    """t (B, K or 1, H, dh) -> (the same values as R = B*K rows of dense heads, the row stride in
    elements). A position shared by a request's beams (K = 1) is expanded to rows: one row stride
    cannot step over beams and requests at once."""
    B = t.shape[0]
    if t.shape[1] == 1 and R != B:
        t = t.expand(B, R // B, H, dh)
    if t.stride(-1) != 1 or t.stride(-2) != dh or t.stride(0) != t.shape[1] * t.stride(1):
        t = t.contiguous()
    return t, t.stride(1)


def own_attention(s: Tensor, n: int, q: Tensor, own_k: list[Tensor], own_v: list[Tensor]) -> Tensor:
    """In place on s: s (B, K, H, S) context scores (the last S - n slots ignored) become the
    context probabilities (own slots zeroed). q (B, K, H, dh); own_k/own_v lists of (B, K or 1, H, dh)
    in order, this step's last; all bf16 or all fp32. Returns the own positions' weighted values
    (B, K, H, dh) in that dtype."""
    # The C side trusts every shape and stride it is given: check them all here.
    if s.dim() != 4 or q.dim() != 4:
        raise ValueError(f"own_attention needs 4-d scores and queries, got {tuple(s.shape)} and {tuple(q.shape)}")
    B, K, H, S = s.shape
    dh = q.shape[-1]
    R = B * K
    if tuple(q.shape[:3]) != (B, K, H) or not 0 <= n <= S or S > MAX_S or dh > MAX_DH:
        raise ValueError(f"own_attention: queries {tuple(q.shape)} do not fit scores {tuple(s.shape)} "
                         f"with n = {n} (S <= {MAX_S}, dh <= {MAX_DH})")
    if not 0 < len(own_k) == len(own_v) <= MAX_OWN or any(
            t.dim() != 4 or t.shape[0] != B or t.shape[1] not in (1, K) or tuple(t.shape[2:]) != (H, dh)
            for t in own_k + own_v):
        raise ValueError(f"own_attention needs 1..{MAX_OWN} own keys and as many values, each (B, K or 1, H, dh) "
                         f"= ({B}, {K} or 1, {H}, {dh})")
    if any(t.device.type != "cpu" for t in (s, q, *own_k, *own_v)):
        raise ValueError("own_attention runs on CPU tensors only")
    if s.stride(-1) != 1 or s.stride(-2) != S or s.stride(0) != K * s.stride(1):
        raise ValueError("own_attention needs score rows with dense heads")
    if not available():
        raise RuntimeError("the fused CPU attention kernel is not available (see kernels.cpu_attention.available)")
    q, q_rs = _rows(q, R, H, dh)
    ks, k_rs = zip(*(_rows(k, R, H, dh) for k in own_k))
    vs, v_rs = zip(*(_rows(v, R, H, dh) for v in own_v))
    if len({s.dtype, q.dtype, *(t.dtype for t in ks + vs)}) != 1 or s.dtype not in _FUNCTIONS:
        raise ValueError("own_attention needs scores, queries, keys and values of one dtype, bf16 or fp32")
    out = torch.empty(B, K, H, dh, dtype=s.dtype)
    m = len(ks)
    kp = (ctypes.c_void_p * m)(*(k.data_ptr() for k in ks))
    vp = (ctypes.c_void_p * m)(*(v.data_ptr() for v in vs))
    krs = (ctypes.c_int64 * m)(*k_rs)
    vrs = (ctypes.c_int64 * m)(*v_rs)
    getattr(_lib, _FUNCTIONS[s.dtype])(R, H, S, n, m, dh, s.data_ptr(), s.stride(1), q.data_ptr(), q_rs,
                                       kp, krs, vp, vrs, out.data_ptr(), torch.get_num_threads())
    return out
