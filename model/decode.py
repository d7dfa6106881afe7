"""The fast cached decoder step of `SIDTransformer`: what one beam-search level costs.

This is the serving/evaluation hot path, kept apart from the training `forward` (which it must
match numerically, see tests/test_decoding.py). It is not a second model: it reads the module's
parameters, and only re-packs them for decoding:

* `pack_weights` concatenates each self-attention's q/k/v into one (3I, D) matrix, folds the
  1/sqrt(dh) softmax scale into the query rows and each RMSNorm's gain into the columns of the
  projection that follows it, in the compute dtype (fp32, or bf16 when the caller runs under a
  bf16 autocast: matmuls in bf16, residual stream, norms and softmax in fp32). The pack is cached
  on the module and rebuilt whenever a parameter changes (tensor version counters), so evaluation
  during training never sees stale weights; the state_dict keys are untouched.
* Beams are the query rows of the cross-attention: the request's K/V (B, H, T, dh) is read once
  per request by one batched attention (SDPA in fp32; two GEMMs + an fp32 softmax in bf16, which
  beats the CPU flash kernel there), never copied per beam.
* The per-beam self-attention reads at most L cached positions: a batched dot product done
  elementwise (MKL's batched GEMM is slower at t <= 4); `enable_compiled_decode` swaps in a
  torch.compile'd version (optional).
* Large steps (B*K rows above `ROW_CHUNK`) run in beam chunks, so the d_ff-wide activations stay
  in cache and under glibc's mmap threshold (a 16k-row GELU input is 64 MB otherwise, page
  faulted afresh on every call).

Measured alternatives that lost (benchmarks/engine_bench.py, this CPU): SDPA for the t <= 4 own
positions, einsum (-> bmm) for either attention, a (B, K, L, H*dh) cache layout, torch.compile of
the whole layer (2.5 min to compile for ~3%).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ROW_CHUNK = 2048  # rows (batch x beams) per chunk: 2048 x d_ff(1024) fp32 = 8 MB of activations


@dataclass
class LayerWeights:
    """One decoder layer's projections; a projection that follows an RMSNorm carries its gain."""

    qkv: Tensor  # (3I, D) self-attention q (pre-scaled by 1/sqrt(dh)) | k | v
    o: Tensor  # (D, I)
    cq: Tensor | None  # (I, D) cross-attention query (not pre-scaled: the attention scales)
    co: Tensor | None  # (D, I)
    up: Tensor  # (F, D)
    down: Tensor  # (D, F)


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
    encdec = model.cfg.arch == "encoder_decoder"
    for layer in model.decoder:
        sa = layer.self_attn if encdec else layer.attn
        scale = 1.0 / math.sqrt(sa.dh)
        # W @ (g * x_hat) == (W * g) @ x_hat: each norm's gain g goes into the next projection.
        qkv = torch.cat([sa.q.weight * scale, sa.k.weight, sa.v.weight], 0) * layer.n1.weight
        ff_gain = (layer.n3 if encdec else layer.n2).weight
        layers.append(LayerWeights(
            qkv=qkv.to(dtype).contiguous(), o=sa.o.weight.to(dtype),
            cq=(layer.cross.q.weight * layer.n2.weight).to(dtype) if encdec else None,
            co=layer.cross.o.weight.to(dtype) if encdec else None,
            up=(layer.ff.up.weight * ff_gain).to(dtype), down=layer.ff.down.weight.to(dtype)))
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


def _own_cache(k: Tensor, v: Tensor, ck: Tensor, cv: Tensor, step: int, write: bool) -> tuple[Tensor, Tensor]:
    """This beam's keys/values over positions 0..step: (B, K, H, step + 1, dh) each.

    write=True: ck/cv are the (B, K, H, L, dh) cache rows; position `step` is written in place.
    write=False (exported graphs): ck/cv hold positions [0, step) only and nothing is written.
    """
    if write:
        ck[:, :, :, step] = k
        cv[:, :, :, step] = v
        return ck[:, :, :, : step + 1], cv[:, :, :, : step + 1]
    if step == 0:
        return k[:, :, :, None], v[:, :, :, None]
    return (torch.cat([ck[:, :, :, :step], k[:, :, :, None].to(ck.dtype)], 3),
            torch.cat([cv[:, :, :, :step], v[:, :, :, None].to(cv.dtype)], 3))


def own_attention(q: Tensor, keys: Tensor, vals: Tensor) -> Tensor:
    """Each beam's attention over its own t <= L positions. q (B, K, H, dh) already carries
    1/sqrt(dh); keys/vals (B, K, H, t, dh). A dot product beats a batched GEMM at t <= 4;
    `enable_compiled_decode` fuses it further."""
    s = (q.to(keys.dtype)[:, :, :, None] * keys).sum(-1).float()  # (B, K, H, t)
    # torch.softmax over a last dim of 2..4 runs ~4x slower than spelling it out
    e = (s - s.amax(-1, keepdim=True)).exp()
    p = (e / e.sum(-1, keepdim=True)).to(vals.dtype)[..., None]  # (B, K, H, t, 1)
    o = p[:, :, :, 0] * vals[:, :, :, 0]  # (B, K, H, dh): accumulate over t, no (.., t, dh) temporary
    for j in range(1, keys.shape[3]):
        o = torch.addcmul(o, p[:, :, :, j], vals[:, :, :, j])
    return o.to(q.dtype)


def _own_attention_apart(q: Tensor, k: Tensor, v: Tensor, ck: Tensor, cv: Tensor) -> Tensor:
    """`own_attention` for exported graphs: this step's k/v (B, K, H, dh) kept apart from the
    cached positions ck/cv (B, K, H, step, dh), which ONNX would otherwise copy into a concat
    and gather back out position by position (~15% of an onnxruntime step at beam 1000)."""
    s = torch.cat([(q[:, :, :, None] * ck).sum(-1), (q * k).sum(-1, keepdim=True)], -1)  # (B, K, H, t)
    p = torch.softmax(s.float(), -1)
    return (p[..., :-1, None] * cv).sum(-2) + p[..., -1:] * v  # (B, K, H, dh)


def enable_compiled_decode(model, enabled: bool = True) -> None:
    """Use a torch.compile'd `own_attention` in this module's decoder steps. Optional: measured
    ~5% per request at beam 1000 in bf16 on the 2-core dev CPU, for ~16 s of compilation at the
    first call (needs a C++ compiler). Compiling whole layers was ~3% for ~150 s: not offered."""
    if enabled:
        model.__dict__["_decode_own_attention"] = torch.compile(own_attention, dynamic=True)
    else:
        model.__dict__.pop("_decode_own_attention", None)


def _qkv(w: LayerWeights, x: Tensor, h: int, dh: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Pre-norm fused q/k/v projection of x (B, K, D) -> q, k, v (B, K, H, dh) in the compute dtype."""
    a = F.linear(F.rms_norm(x, (x.shape[-1],), None, eps).to(w.qkv.dtype), w.qkv)  # (B, K, 3I)
    return tuple(t.unflatten(-1, (h, dh)) for t in a.split(h * dh, -1))


def _ffn(w: LayerWeights, x: Tensor, eps: float) -> Tensor:
    """Pre-norm GELU feed-forward with its residual: x (B, K, D) fp32 -> x + FF(x)."""
    u = F.gelu(F.linear(F.rms_norm(x, (x.shape[-1],), None, eps).to(w.up.dtype), w.up))  # (B, K, F)
    return x + F.linear(u, w.down)


def _layer_encdec(w: LayerWeights, x: Tensor, pk: Tensor, pv: Tensor, mask: Tensor,
                  ck: Tensor, cv: Tensor, step: int, h: int, dh: int, eps: float, write: bool,
                  own=own_attention) -> tuple[Tensor, Tensor, Tensor]:
    """One decoder layer for K beams. Returns (x, k, v): k/v (B, K, H, dh) of this step."""
    B, K, _ = x.shape
    I = h * dh
    dt = w.qkv.dtype
    q, k, v = _qkv(w, x, h, dh, eps)  # (B, K, H, dh) each
    if write:
        keys, vals = _own_cache(k, v, ck, cv, step, write)  # (B, K, H, t, dh), this step written
        o = v if step == 0 else own(q, keys, vals)  # one position: the softmax is 1, the output is v
    else:
        o = v if step == 0 else _own_attention_apart(q, k, v, ck, cv)
    x = x + F.linear(o.reshape(B, K, I), w.o)
    q = F.linear(F.rms_norm(x, (x.shape[-1],), None, eps).to(dt), w.cq)  # (B, K, I)
    q = q.view(B, K, h, dh).transpose(1, 2)  # (B, H, K, dh): the beams are query rows
    if dt == torch.float32:
        o = F.scaled_dot_product_attention(q, pk, pv, attn_mask=mask)  # (B, H, K, dh)
    else:  # bf16/fp16: two GEMMs + an fp32 softmax beat the CPU flash kernel by ~1.5x here
        s = torch.matmul(q, pk.transpose(-1, -2) * (dh ** -0.5)).float() + mask  # (B, H, K, T)
        o = torch.matmul(torch.softmax(s, -1).to(dt), pv)
    x = x + F.linear(o.transpose(1, 2).reshape(B, K, I), w.co)
    return _ffn(w, x, eps), k, v


def _layer_deconly(w: LayerWeights, x: Tensor, pk: Tensor, pv: Tensor, mask: Tensor,
                   ck: Tensor, cv: Tensor, step: int, h: int, dh: int, eps: float, write: bool,
                   own=None) -> tuple[Tensor, Tensor, Tensor]:
    """One causal layer: the K beams attend jointly to the shared history and their own codes."""
    B, K, _ = x.shape
    I = h * dh
    dt = w.qkv.dtype
    q, k, v = _qkv(w, x, h, dh, eps)  # (B, K, H, dh) each
    keys, vals = _own_cache(k, v, ck, cv, step, write)  # (B, K, H, t, dh)
    T = pk.shape[2]
    s_pre = torch.matmul(q.transpose(1, 2), pk.transpose(-1, -2)).float() + mask  # (B, H, K, T)
    s_own = (q.to(keys.dtype)[:, :, :, None] * keys).sum(-1).float()  # (B, K, H, t)
    p = torch.softmax(torch.cat([s_pre, s_own.transpose(1, 2)], -1), -1)  # (B, H, K, T + t)
    o = torch.matmul(p[..., :T].to(dt), pv).transpose(1, 2)  # (B, K, H, dh)
    p_own = p[..., T:].transpose(1, 2).to(vals.dtype)  # (B, K, H, t)
    o = o + (p_own[..., None] * vals).sum(-2).to(dt)
    x = x + F.linear(o.reshape(B, K, I).to(dt), w.o)
    return _ffn(w, x, eps), k, v


def decoder_layers(cfg, w: DecodeWeights, x: Tensor, pks: list[Tensor], pvs: list[Tensor], mask: Tensor,
                   cks: list[Tensor], cvs: list[Tensor], step: int, write: bool = True,
                   own=own_attention) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """All decoder layers + output head for one step. x (B, K, D) fp32 -> (logits (B, K, C_step), ks, vs)."""
    layer_fn = _layer_encdec if cfg.arch == "encoder_decoder" else _layer_deconly
    ks, vs = [], []
    for i, lw in enumerate(w.layers):
        x, k, v = layer_fn(lw, x, pks[i], pvs[i], mask, cks[i], cvs[i], step,
                           cfg.n_heads, cfg.d_head, w.eps, write, own)
        ks.append(k)
        vs.append(v)
    hn = F.rms_norm(x, (x.shape[-1],), None, w.eps).to(w.dtype)
    return F.linear(hn, w.level_emb[step]).float(), ks, vs


def step_mask(cfg, prefix_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, 1, 1, T) additive mask in the dtype each arch's attention wants (SDPA: the query's)."""
    return prefix_mask.to(dtype) if cfg.arch == "encoder_decoder" and dtype == torch.float32 else prefix_mask.float()


def context_mask(cfg, prefix_mask: Tensor, pvs: list[Tensor], dtype: torch.dtype, spelled_out: bool
                 ) -> tuple[Tensor, list[Tensor]]:
    """(mask, values) for the cross-attention, keeping torch's rule that a request with an empty
    history (all keys masked) gets output 0, not NaN, when the softmax is spelled out (bf16 GEMMs,
    exported graphs): its mask row becomes 0 (a harmless uniform softmax) and its values 0."""
    mask = step_mask(cfg, prefix_mask, dtype)
    if cfg.arch != "encoder_decoder" or not spelled_out:
        return mask, pvs
    has_ctx = (prefix_mask > float("-inf")).any(-1, keepdim=True)  # (B, 1, 1, 1)
    return (torch.where(has_ctx, mask, torch.zeros_like(mask)),
            [v * has_ctx.to(v.dtype) for v in pvs])  # (B, H, T, dh): tiny, once per step


def run_decoder(model, w: DecodeWeights, x: Tensor, prefix, cache, step: int) -> Tensor:
    """x (B, K, D) fp32 embedded inputs -> logits (B, K, C_step) in fp32, chunked over beams."""
    B, K, _ = x.shape
    cfg = model.cfg
    dt = w.dtype
    # Shared per request: cast once per step (a no-op when prefill ran in the compute dtype).
    pks = [k.to(dt) for k in prefix.keys]
    pvs = [v.to(dt) for v in prefix.values]
    mask, pvs = context_mask(cfg, prefix.mask, pvs, dt, spelled_out=dt != torch.float32)
    own = model.__dict__.get("_decode_own_attention", own_attention)
    chunk = max(1, ROW_CHUNK // max(B, 1)) if x.device.type == "cpu" else K  # GPUs want one big step
    outs = []
    for k0 in range(0, K, chunk):
        k1 = min(K, k0 + chunk)
        logits, _, _ = decoder_layers(cfg, w, x[:, k0:k1], pks, pvs, mask,
                                      [c[:, k0:k1] for c in cache.keys], [c[:, k0:k1] for c in cache.values], step,
                                      own=own)
        outs.append(logits)  # (B, Kc, C_step)
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


def compute_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype (bf16, or fp16 on CUDA) when the caller runs under autocast, else fp32."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.float32
