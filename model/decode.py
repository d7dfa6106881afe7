"""The fast cached decoder of `SIDTransformer`: prefill and one beam-search level per call.

This is the serving/evaluation hot path, kept apart from the training `forward` (which it must
match numerically, see tests/test_decoding.py). It is not a second model: it reads the module's
parameters, and only re-packs them for decoding:

* `pack_weights` concatenates each self-attention's q/k/v into one (3I, D) matrix, folds the
  1/sqrt(dh) softmax scale into the query rows and each RMSNorm's gain into the columns of the
  projection that follows it, in the compute dtype (fp32, or bf16 when the caller runs under a
  bf16 autocast: matmuls in bf16, residual stream, norms and softmax in fp32). The pack is cached
  on the module and rebuilt whenever a parameter changes (tensor version counters), so evaluation
  during training never sees stale weights; the state_dict keys are untouched.
* What every beam of a request attends to alike is its *context*: the history (decoder-only) or
  the encoder memory (cross-attention), plus, for the decoder-only model, the step-0 BOS position,
  which one beam decoded for all of them. `BeamCache` keeps such a position once per request, not
  once per beam. The context is read once per request by batched GEMMs; nothing is copied per beam.
* Wide steps attend to the context in *absorbed* form (`Context`): the query projection is folded
  into the context keys (A = Wq_h^T K_h, so scores = x_norm @ A) and the output projection into
  its values (Wo_h V_h), once per search. The beams' scores and outputs then come out of one GEMM
  each, already in the (batch, beam, head) layout, with no per-step transposes of q, p or o.
  Narrow steps (under `ABSORB_MIN_BEAMS` beams: the encoder-decoder's step 0, small beams)
  attend directly: folding costs more than it saves there.
* The decoder-only prefill runs BOS as the next token of the history (`prefill_decoder_only`),
  so step 0 costs one row of the prefill instead of a decoder pass.
* Each beam's own positions (its parents' codes and itself, at most L) are dot products done
  elementwise: a batched GEMM per (beam, head) of size 1 x dh x t is slower at t <= 4. On the CPU
  they run in one fused pass (`kernels.cpu_fused`, built on first use; torch ops where it
  cannot be built): in a decoder-only absorbed step the dots, the one softmax over context and
  own positions and the own values' weighted sum; in an encoder-decoder step the self-attention
  over the own positions, and the cross-attention's softmax in place.
* Large steps (B*K rows above `ROW_CHUNK`) run in beam chunks, so the d_ff-wide activations stay
  under glibc's mmap threshold (not page-faulted afresh on every call).

Measured on the 2-core AVX-512-BF16 dev CPU, bf16, the Beauty model (4 layers, 3-code SIDs), one
step of 32 requests x 256 beams: absorbed 101 ms vs direct 111 ms (the direct form's per-head
GEMMs are tiny and need q, p and o transposed); chunks of 8192 rows 88-98 ms vs 2048 rows
120-130 ms. Against the previous design (a dense (B, K, H, L, dh) cache written per beam and
first touched by the BOS copy, the history attended directly, step 0 a decoder pass), the whole
search at 32 x 256 went from 345-351 to 196-207 ms and at 1 x 100 from 25-27 to 18 ms
(benchmarks/engine_scaling.py, best of 7, the two versions run alternately; README: Service).
Measured and not taken: torch.compile of the decoder-only step (dynamic shapes) compiled in 33 s
and ran slower, 16 -> 21 ms at 1 x 100 and 98 -> 201 ms at 32 x 100.

The exported graphs of the ONNX backend trace `decoder_layers` (plain tensors in, plain tensors
out, the whole per-beam cache as one input); it computes the same step without the per-search
state, and tests hold the two to each other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from sidrec.kernels import cpu_fused

ROW_CHUNK = 8192  # rows (batch x beams) per chunk: 8192 x d_ff(1024) bf16 = 16 MB, under the 32 MB mmap threshold
# Steps with at least this many beams per request attend to the context in absorbed form.
ABSORB_MIN_BEAMS = 16


@dataclass
class LayerWeights:
    """One decoder layer's projections; a projection that follows an RMSNorm carries its gain."""

    qkv: Tensor  # (3I, D) self-attention q (pre-scaled by 1/sqrt(dh)) | k | v
    o: Tensor  # (D, I)
    cq: Tensor | None  # (I, D) cross-attention query (not pre-scaled: the attention scales)
    co: Tensor | None  # (D, I)
    up: Tensor  # (F, D)
    down: Tensor  # (D, F)
    # The context attention's projections per head, for its absorbed form (`build_context`):
    # query (H, dh, D) with the softmax scale in, output (H, dh, D) = Wo_h^T.
    ctx_q: Tensor
    ctx_o: Tensor


@dataclass
class DecodeWeights:
    dtype: torch.dtype
    signature: tuple  # (data_ptr, version) of every parameter when packed
    layers: list[LayerWeights]
    level_emb: list[Tensor]  # per level: (C_l, D) tied output embedding * D^-0.5 * final norm gain
    eps: float


def _signature(model) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def pack_weights(model, dtype: torch.dtype) -> DecodeWeights:
    """Re-pack `model`'s decoder parameters for decoding in `dtype` (no caching; traceable)."""
    layers = []
    cfg = model.cfg
    encdec = cfg.arch == "encoder_decoder"
    H, dh, D = cfg.n_heads, cfg.d_head, cfg.d_model
    for layer in model.decoder:
        sa = layer.self_attn if encdec else layer.attn
        scale = 1.0 / math.sqrt(sa.dh)
        # W @ (g * x_hat) == (W * g) @ x_hat: each norm's gain g goes into the next projection.
        qkv = torch.cat([sa.q.weight * scale, sa.k.weight, sa.v.weight], 0) * layer.n1.weight
        ff_gain = (layer.n3 if encdec else layer.n2).weight
        cq = layer.cross.q.weight * layer.n2.weight if encdec else None
        ctx_q = cq * scale if encdec else qkv[: H * dh]  # the context's query: cross, or this attention's
        ctx_o = (layer.cross.o if encdec else sa.o).weight
        layers.append(LayerWeights(
            qkv=qkv.to(dtype).contiguous(), o=sa.o.weight.to(dtype),
            cq=cq.to(dtype) if encdec else None,
            co=layer.cross.o.weight.to(dtype) if encdec else None,
            up=(layer.ff.up.weight * ff_gain).to(dtype), down=layer.ff.down.weight.to(dtype),
            ctx_q=ctx_q.reshape(H, dh, D).to(dtype).contiguous(),
            ctx_o=ctx_o.reshape(D, H, dh).permute(1, 2, 0).to(dtype).contiguous()))
    emb = model.tok_emb.weight
    lv = [(emb[o: o + c] * (model.cfg.d_model ** -0.5) * model.dec_norm.weight).to(dtype).contiguous()
          for o, c in zip(model.offsets, model.cards)]
    return DecodeWeights(dtype, (), layers, lv, model.dec_norm.eps)


def decode_weights(model, dtype: torch.dtype) -> DecodeWeights:
    """The packed decode weights of `model` in `dtype`, cached on the module until a parameter changes."""
    sig = _signature(model)
    store = model.__dict__.setdefault("_decode_weights", {})
    w = store.get(dtype)
    if w is not None and w.signature == sig:
        return w
    with torch.no_grad():
        w = pack_weights(model, dtype)
    w.signature = sig
    store[dtype] = w  # ~2.5 MB per dtype at the TIGER size
    return w


def _norm(x: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """RMSNorm without gain (the gain lives in the next projection), cast to the matmul dtype.
    On the CPU one fused pass (`kernels.cpu_fused.rms_norm`) instead of five; exported graphs
    keep the torch op."""
    if not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export() and cpu_fused.rms_norm_supports(x, dtype):
        return cpu_fused.rms_norm(x, eps, dtype)
    return F.rms_norm(x, (x.shape[-1],), None, eps).to(dtype)


def _ffn(w: LayerWeights, x: Tensor, eps: float) -> Tensor:
    """Pre-norm GELU feed-forward with its residual: x (B, K, D) fp32 -> x + FF(x)."""
    return x + F.linear(F.gelu(F.linear(_norm(x, eps, w.up.dtype), w.up)), w.down)


def _split_heads(a: Tensor, h: int, dh: int) -> tuple[Tensor, Tensor, Tensor]:
    """(..., 3I) fused projection -> q, k, v (..., H, dh) views."""
    return tuple(t.unflatten(-1, (h, dh)) for t in a.split(h * dh, -1))


def _dots(q: Tensor, keys: list[Tensor]) -> Tensor:
    """q (B, K, H, dh) against each of `keys` (B, K or 1, H, dh) -> (B, K, H, len(keys)) in q's
    dtype (the sum accumulates in fp32)."""
    if len(keys) == 1:
        return (q * keys[0]).sum(-1, keepdim=True)
    return torch.stack([(q * k).sum(-1) for k in keys], -1)


def _weighted(p: Tensor, vals: list[Tensor]) -> Tensor:
    """sum_j p[..., j] * vals[j]: p (B, K, H, n) probabilities, vals (B, K or 1, H, dh) -> (B, K, H, dh)."""
    p = p.to(vals[0].dtype)[..., None]
    o = p[..., 0, :] * vals[0]
    for j in range(1, len(vals)):
        o = torch.addcmul(o, p[..., j, :], vals[j])
    return o


def _softmax_small(s: Tensor) -> Tensor:
    """Softmax over a last dim of 1..L: torch.softmax there is ~4x slower than spelling it out."""
    e = (s - s.amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


# ---- prefill (decoder-only) ------------------------------------------------------------------
@dataclass
class FirstStep:
    """The BOS step, which every beam of a request shares, computed with the history's prefill:
    logits (B, 1, C_0) fp32 and per-layer keys/values (B, 1, H, dh) in the compute dtype."""

    logits: Tensor
    keys: list[Tensor]
    values: list[Tensor]


def prefill_decoder_only(model, w: DecodeWeights, x: Tensor, src_mask: Tensor
                         ) -> tuple[list[Tensor], list[Tensor], FirstStep]:
    """Run the history and then BOS once through the packed layers: BOS is only the next token
    of the same causal stream, so step 0 costs one more row here rather than a decoder pass.

    x (B, T + 1, D) fp32: the embedded history (left-padded) then BOS; src_mask (B, T) bool.
    Returns the history's per-layer keys/values (B, H, T, dh) in the compute dtype and the
    `FirstStep`. In the last layer only the BOS row goes past the K/V projection: nothing reads
    the history's outputs there."""
    cfg = model.cfg
    B, T1, _ = x.shape
    T = T1 - 1
    h, dh = cfg.n_heads, cfg.d_head
    keep = torch.cat([src_mask, src_mask.new_ones(B, 1)], 1)
    ar = torch.arange(T1, device=x.device)  # comparisons, not tril/eye: both export to ONNX
    allowed = ((ar[:, None] >= ar[None]) & keep[:, None, :]) | (ar[:, None] == ar[None])  # (B, T1, T1)
    mask = torch.zeros(allowed.shape, dtype=w.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
    mask = mask.repeat_interleave(h, 0)  # (B*H, T1, T1), one per (request, head)
    ks, vs, k0, v0 = [], [], [], []
    for i, lw in enumerate(w.layers):
        q, k, v = (t.transpose(1, 2) for t in _split_heads(F.linear(_norm(x, w.eps, w.dtype), lw.qkv), h, dh))
        ks.append(k[:, :, :T].contiguous())
        vs.append(v[:, :, :T].contiguous())
        k0.append(k[:, :, T:].transpose(1, 2))  # (B, 1, H, dh)
        v0.append(v[:, :, T:].transpose(1, 2))
        if i == len(w.layers) - 1:  # only BOS needs this layer's output
            q, mask, x = q[:, :, T:], mask[:, T:], x[:, T:]
        # q carries 1/sqrt(dh). Two GEMMs and an fp32 softmax: 3x faster than the CPU flash
        # kernel at T = 60 in bf16, and what an exported graph wants anyway.
        p = torch.softmax(torch.baddbmm(mask, q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2)), -1,
                          dtype=torch.float32)  # (B*H, rows, T1)
        o = torch.bmm(p.to(w.dtype), v.flatten(0, 1)).view(B, h, -1, dh)
        x = x + F.linear(o.transpose(1, 2).reshape(B, -1, h * dh), lw.o)
        x = _ffn(lw, x, w.eps)
    logits = F.linear(_norm(x, w.eps, w.dtype), w.level_emb[0]).float()  # (B, 1, C_0)
    return ks, vs, FirstStep(logits, k0, v0)


# ---- the per-search cache ----------------------------------------------------------------------
@dataclass
class BeamCache:
    """Each beam's own self-attention K/V, one entry per decoded position.

    keys[i][j] / values[i][j]: layer i, position j, (B, K_j, H, dh). A position decoded with one
    beam per request (K_j = 1: the BOS step of a beam search) is every beam's alike and is kept
    once, broadcast, never copied per beam. `contexts` holds what the decoder derived from the
    request's context for this search (see `Context`); it is built on first use.
    """

    keys: list[list[Tensor]]
    values: list[list[Tensor]]
    contexts: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, n_layers: int) -> "BeamCache":
        return cls([[] for _ in range(n_layers)], [[] for _ in range(n_layers)])

    @property
    def length(self) -> int:
        return len(self.keys[0]) if self.keys else 0

    def append(self, ks: list[Tensor], vs: list[Tensor]) -> None:
        """Add one position: per layer (B, K, H, dh)."""
        for buf, new in ((self.keys, ks), (self.values, vs)):
            for layer, t in zip(buf, new):
                layer.append(t)

    def shared(self, j: int) -> bool:
        return self.keys[0][j].shape[1] == 1

    def reorder(self, parents: Tensor, length: int) -> None:
        """Make beam j of the next step continue from beam parents[:, j]. parents: (B, K').

        Positions [0, length) move, as one row gather per (request, beam, position); shared
        positions stay as they are."""
        B = parents.shape[0]
        flat = {}
        for buf in (self.keys, self.values):
            for layer in buf:
                for j in range(min(length, len(layer))):
                    c = layer[j]
                    K = c.shape[1]
                    if K == 1:
                        continue
                    if K not in flat:
                        flat[K] = (parents + torch.arange(B, device=parents.device)[:, None] * K).reshape(-1)
                    layer[j] = c.flatten(0, 1).index_select(0, flat[K]).view(B, parents.shape[1], *c.shape[2:])


# ---- the request's context -------------------------------------------------------------------
@dataclass
class Context:
    """What all beams of a request attend to alike in one attention of one layer.

    Direct form: keys_t (B, H, dh, S) (query scale folded in), values (B, H, S, dh).
    Absorbed form: a (B, H*S, D) with scores = x_norm @ a^T, and bv (B, H*S, D) with the
    attention output *after* the output projection = p @ bv.
    mask (B, 1, 1, S), or (B, 1, H*S) in absorbed form: additive, in the compute dtype (0 and
    -inf are exact in bf16), over the n = T (+ shared positions) context slots and `slots` more
    zero slots after them, where a step writes its beams' own scores (decoder-only: one softmax
    over history and own codes); S = n + slots.
    Scores come out of the GEMM in the compute dtype with the mask added; the softmax reads them
    into fp32 (a bf16-out softmax is 4x slower on the CPU) and the GEMM after it reads p cast back.
    """

    mask: Tensor
    n: int  # context positions (before the own slots)
    slots: int  # zero slots after them for own scores
    keys_t: Tensor | None = None
    values: Tensor | None = None
    a: Tensor | None = None
    bv: Tensor | None = None


def build_context(keys: Tensor, values: Tensor, mask: Tensor, w: LayerWeights, scale: float,
                  slots: int, absorbed: bool) -> Context:
    """keys/values (B, H, T, dh) and mask (B, 1, 1, T) -> `Context` in the weights' dtype.
    w.ctx_q / w.ctx_o: the attention's per-head query and output projections (absorbed form);
    `scale` is the query scale the direct form folds into the keys (1 where q carries it)."""
    B, H, T, dh = keys.shape
    dt = w.ctx_q.dtype
    mask = mask.to(dt)
    if slots:
        z = keys.new_zeros(B, H, slots, dh)
        keys, values = torch.cat([keys, z], 2), torch.cat([values, z], 2)
    S = T + slots
    if absorbed:
        D = w.ctx_q.shape[2]
        # s[b,k,h,t] = (Wq_h xn) . K[b,h,t] = xn . (Wq_h^T K[b,h,t]);  o = sum_h Wo_h (sum_t p V) = p @ (V Wo_h^T)
        # One GEMM per head over all requests' positions: (H, B*S, dh) @ (H, dh, D).
        def fold(t: Tensor, w: Tensor) -> Tensor:
            out = torch.bmm(t.to(dt).transpose(0, 1).reshape(H, B * S, dh), w)  # (H, B*S, D)
            return out.view(H, B, S, D).transpose(0, 1).reshape(B, H * S, D)
        a, bv = fold(keys, w.ctx_q), fold(values, w.ctx_o)
        return Context(mask.expand(-1, -1, H, -1).reshape(B, 1, H * S), T, slots, a=a, bv=bv)
    return Context(mask, T, slots, keys_t=(keys.to(dt) * scale).transpose(-1, -2).contiguous(),
                   values=values.to(dt).contiguous())


def _context_scores(ctx: Context, xn: Tensor, q: Tensor | None) -> Tensor:
    """(B, Kc, H, S) masked scores in the compute dtype; xn (B, Kc, D) the normed input, q (B, Kc, H, dh)."""
    if ctx.a is not None:  # the mask is added inside the GEMM
        return torch.baddbmm(ctx.mask, xn, ctx.a.transpose(1, 2)).unflatten(-1, (-1, ctx.n + ctx.slots))
    return (torch.matmul(q.transpose(1, 2), ctx.keys_t) + ctx.mask).transpose(1, 2)


def _context_output(ctx: Context, p: Tensor, wo: Tensor, own: Tensor | None) -> Tensor:
    """p (B, Kc, H, S) probabilities in the compute dtype; own (B, Kc, H, dh) the own positions'
    weighted values (or None) -> the attention block's output after the output projection (B, Kc, D)."""
    B, Kc, H, S = p.shape
    if ctx.a is not None:
        out = torch.matmul(p.reshape(B, Kc, H * S), ctx.bv)  # (B, Kc, D)
        if own is None:
            return out
        D = out.shape[-1]
        return torch.addmm(out.view(-1, D), own.reshape(B * Kc, -1), wo.t()).view(B, Kc, D)
    o = torch.matmul(p.transpose(1, 2), ctx.values).transpose(1, 2)  # (B, Kc, H, dh)
    if own is not None:
        o = o + own
    return F.linear(o.reshape(B, Kc, -1), wo)


# ---- one cached step -------------------------------------------------------------------------
def _step_deconly(w: LayerWeights, x: Tensor, ctx: Context, own_k: list[Tensor], own_v: list[Tensor],
                  h: int, dh: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """One causal layer for Kc beams: one softmax over the context and each beam's own positions
    (own_k/own_v, then itself). Returns (x, k, v), k/v (B, Kc, H, dh) of this step."""
    xn = _norm(x, eps, w.qkv.dtype)
    q, k, v = _split_heads(F.linear(xn, w.qkv), h, dh)
    n_own = len(own_k) + 1
    s = _context_scores(ctx, xn, q)  # (B, Kc, H, S) (the own slots are 0 here)
    if ctx.a is not None and cpu_fused.supports(s, q, n_own):  # the same, fused in one pass
        own = cpu_fused.own_attention(s, ctx.n, q, own_k + [k], own_v + [v])
        p = s  # the probabilities, written in place in the compute dtype
    else:
        s[..., ctx.n: ctx.n + n_own] = _dots(q, own_k + [k])
        if n_own < ctx.slots:
            s[..., ctx.n + n_own:] = float("-inf")
        p = torch.softmax(s, -1, dtype=torch.float32)
        own = _weighted(p[..., ctx.n: ctx.n + n_own], own_v + [v])
        p = p.to(w.qkv.dtype)
    x = x + _context_output(ctx, p, w.o, own)
    return _ffn(w, x, eps), k, v


def _step_encdec(w: LayerWeights, x: Tensor, ctx: Context, own_k: list[Tensor], own_v: list[Tensor],
                 h: int, dh: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """One decoder layer for Kc beams: self-attention over the own positions, then cross-attention."""
    dt = w.qkv.dtype
    q, k, v = _split_heads(F.linear(_norm(x, eps, dt), w.qkv), h, dh)
    if not own_k:
        o = v  # one position: the softmax is 1, the output is v
    elif cpu_fused.supports(None, q, len(own_k) + 1):  # the same, fused in one pass
        o = cpu_fused.self_attention(q, own_k + [k], own_v + [v])
    else:
        o = _weighted(_softmax_small(_dots(q, own_k + [k]).float()), own_v + [v])
    x = x + F.linear(o.reshape(*x.shape[:2], -1), w.o)
    xn = _norm(x, eps, dt)
    cq = None if ctx.a is not None else F.linear(xn, w.cq).unflatten(-1, (h, dh))
    s = _context_scores(ctx, xn, cq)
    if ctx.a is not None and cpu_fused.supports(s, q, 0):
        p = cpu_fused.softmax_(s)  # in place, in the compute dtype
    else:
        p = torch.softmax(s, -1, dtype=torch.float32).to(dt)
    x = x + _context_output(ctx, p, w.co, None)
    return _ffn(w, x, eps), k, v


def _contexts(model, w: DecodeWeights, prefix, cache: BeamCache, shared: list[int], absorbed: bool) -> list[Context]:
    """This search's per-layer contexts, built once per (shared positions, form) and kept in the cache."""
    key = (tuple(shared), absorbed)
    got = cache.contexts.get(key)
    if got is not None:
        return got
    cfg = model.cfg
    encdec = cfg.arch == "encoder_decoder"
    base_mask, values = context_mask(cfg, prefix.mask, [v.to(w.dtype) for v in prefix.values])
    ctxs = []
    for i, lw in enumerate(w.layers):
        keys, vals, mask = prefix.keys[i].to(w.dtype), values[i], base_mask
        if encdec:
            ctxs.append(build_context(keys, vals, mask, lw, cfg.d_head ** -0.5, 0, absorbed))
            continue
        if shared:  # positions decoded once for all beams join the history
            keys = torch.cat([keys] + [cache.keys[i][j].transpose(1, 2).to(w.dtype) for j in shared], 2)
            vals = torch.cat([vals] + [cache.values[i][j].transpose(1, 2).to(w.dtype) for j in shared], 2)
            mask = torch.cat([mask, mask.new_zeros(*mask.shape[:3], len(shared))], -1)
        slots = model.L - len(shared)  # room for every own position a later step can have
        mask = torch.cat([mask, mask.new_zeros(*mask.shape[:3], slots)], -1)
        ctxs.append(build_context(keys, vals, mask, lw, 1.0, slots, absorbed))
    cache.contexts[key] = ctxs
    return ctxs


def run_decoder(model, w: DecodeWeights, x: Tensor, prefix, cache: BeamCache, step: int) -> Tensor:
    """x (B, K, D) fp32 embedded inputs of step `step` -> logits (B, K, C_step) in fp32.
    Appends this step's K/V to `cache`. Chunked over beams on the CPU."""
    B, K, _ = x.shape
    cfg = model.cfg
    if cache.length != step:
        raise ValueError(f"decode step {step} needs a cache holding {step} positions, it holds {cache.length}")
    encdec = cfg.arch == "encoder_decoder"
    shared = [j for j in range(step) if cache.shared(j)] if not encdec else []
    own = [j for j in range(step) if j not in shared]
    ctxs = _contexts(model, w, prefix, cache, shared, absorbed=K >= ABSORB_MIN_BEAMS)
    layer_fn = _step_encdec if encdec else _step_deconly
    chunk = max(1, ROW_CHUNK // max(B, 1)) if x.device.type == "cpu" else K  # GPUs want one big step
    outs, ks, vs = [], [[] for _ in w.layers], [[] for _ in w.layers]
    for k0 in range(0, K, chunk):
        k1 = min(K, k0 + chunk)
        xc = x[:, k0:k1]

        def beams(c: Tensor) -> Tensor:
            return c if c.shape[1] == 1 else c[:, k0:k1]
        for i, lw in enumerate(w.layers):
            xc, k, v = layer_fn(lw, xc, ctxs[i], [beams(cache.keys[i][j]) for j in own],
                                [beams(cache.values[i][j]) for j in own], cfg.n_heads, cfg.d_head, w.eps)
            ks[i].append(k)
            vs[i].append(v)
        outs.append(F.linear(_norm(xc, w.eps, w.dtype), w.level_emb[step]).float())
    cache.append([c[0] if len(c) == 1 else torch.cat(c, 1) for c in ks],
                 [c[0] if len(c) == 1 else torch.cat(c, 1) for c in vs])
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


# ---- exported graphs (ONNX backend) ------------------------------------------------------------
def _own_attention_apart(q: Tensor, k: Tensor, v: Tensor, ck: Tensor, cv: Tensor) -> Tensor:
    """Each beam's attention over its own positions for exported graphs: this step's k/v
    (B, K, H, dh) kept apart from the cached positions ck/cv (B, K, H, step, dh), which ONNX would
    otherwise copy into a concat and gather back out position by position."""
    s = torch.cat([(q[:, :, :, None] * ck).sum(-1), (q * k).sum(-1, keepdim=True)], -1)  # (B, K, H, t)
    p = torch.softmax(s.float(), -1)
    return (p[..., :-1, None] * cv).sum(-2) + p[..., -1:] * v  # (B, K, H, dh)


def _graph_layer(cfg, w: LayerWeights, x: Tensor, pk: Tensor, pv: Tensor, mask: Tensor,
                 ck: Tensor | None, cv: Tensor | None, h: int, dh: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """One decoder layer of an exported step, fp32: x (B, K, D); prefix pk/pv (B, H, T, dh);
    ck/cv (B, K, H, step, dh) the beams' cached positions (None at step 0)."""
    B, K, _ = x.shape
    q, k, v = _split_heads(F.linear(_norm(x, eps, w.qkv.dtype), w.qkv), h, dh)  # (B, K, H, dh)
    if cfg.arch == "encoder_decoder":
        o = v if ck is None else _own_attention_apart(q, k, v, ck, cv)
        x = x + F.linear(o.reshape(B, K, h * dh), w.o)
        cq = F.linear(_norm(x, eps, w.cq.dtype), w.cq).view(B, K, h, dh).transpose(1, 2)  # (B, H, K, dh)
        s = torch.matmul(cq, pk.transpose(-1, -2) * (dh ** -0.5)) + mask  # (B, H, K, T)
        o = torch.matmul(torch.softmax(s, -1), pv).transpose(1, 2)
        x = x + F.linear(o.reshape(B, K, h * dh), w.co)
        return _ffn(w, x, eps), k, v
    T = pk.shape[2]
    keys = k[:, :, :, None] if ck is None else torch.cat([ck, k[:, :, :, None]], 3)  # (B, K, H, t, dh)
    vals = v[:, :, :, None] if cv is None else torch.cat([cv, v[:, :, :, None]], 3)
    s_pre = torch.matmul(q.transpose(1, 2), pk.transpose(-1, -2)) + mask  # (B, H, K, T)
    s_own = (q[:, :, :, None] * keys).sum(-1)  # (B, K, H, t)
    p = torch.softmax(torch.cat([s_pre, s_own.transpose(1, 2)], -1), -1)  # (B, H, K, T + t)
    o = torch.matmul(p[..., :T], pv).transpose(1, 2) + (p[..., T:].transpose(1, 2)[..., None] * vals).sum(-2)
    x = x + F.linear(o.reshape(B, K, h * dh), w.o)
    return _ffn(w, x, eps), k, v


def decoder_layers(cfg, w: DecodeWeights, x: Tensor, pks: list[Tensor], pvs: list[Tensor], mask: Tensor,
                   cks: list[Tensor | None], cvs: list[Tensor | None], step: int
                   ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """All decoder layers + output head for one step of an exported graph (fp32, no per-search
    state). x (B, K, D) -> (logits (B, K, C_step), this step's k and v per layer)."""
    ks, vs = [], []
    for i, lw in enumerate(w.layers):
        x, k, v = _graph_layer(cfg, lw, x, pks[i], pvs[i], mask, cks[i], cvs[i], cfg.n_heads, cfg.d_head, w.eps)
        ks.append(k)
        vs.append(v)
    return F.linear(_norm(x, w.eps, w.dtype), w.level_emb[step]), ks, vs


def context_mask(cfg, prefix_mask: Tensor, pvs: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """(fp32 mask, values) of the context a step attends to (cached steps and exported graphs),
    with torch's rule that a request whose history is empty (all keys masked) gets output 0, not
    NaN: its mask row becomes 0 (a harmless uniform softmax) and its values 0. Decoder-only steps
    always have their own positions in the same softmax: nothing to do."""
    mask = prefix_mask.float()
    if cfg.arch != "encoder_decoder":
        return mask, pvs
    has_ctx = (mask > float("-inf")).any(-1, keepdim=True)  # (B, 1, 1, 1)
    return (torch.where(has_ctx, mask, torch.zeros_like(mask)), [v * has_ctx.to(v.dtype) for v in pvs])


def compute_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype (bf16, or fp16 on CUDA) when the caller runs under autocast, else fp32."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.float32
