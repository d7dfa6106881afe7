"""ONNX Runtime backend for beam search: the same `Decoder` protocol as `SIDTransformer`.

`OnnxDecoder.from_model(model)` exports, once per (weights, config, versions), one prefill graph
and one decoder-step graph per SID level (the level fixes the position embedding and the
codebook slice of the output head) into a cache directory (`$SIDREC_CACHE` or
`~/.cache/sidrec/onnx/<key>`; never the repository), then serves `prefill`, `new_cache`,
`decode_step` and `offsets` from onnxruntime sessions, so `model.beam_search.beam_search`
runs unchanged on it.

The step graphs are pure functions: they read the prefix K/V and the whole per-beam cache
(B, Kmax, H, L, dh) as plain tensors (zero-copy from torch), slice the positions they need, and
return the logits plus this step's K/V, which the backend writes into its `DenseBeamCache`. The
step math is `model.decode.decoder_layers`, traced; tests hold it to the torch path. It is not a
training exporter.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sidrec.model.decode import context_mask, decoder_layers, pack_weights
from sidrec.model.transformer import Prefix, SIDTransformer

EXPORT_VERSION = 2
OPSET = 17


def _sdpa_nan_safe(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                   nan_safe=True):
    """SDPA written out for export, with torch's CPU kernel's rule that a row whose keys are all
    masked (an empty history) outputs 0 rather than NaN. The step graphs never see such a row
    (`context_mask` rewrites it) and skip that guard: a (B, H, K, T) select per layer."""
    if is_causal or dropout_p:
        raise NotImplementedError(f"export-time SDPA supports an additive mask only ({is_causal=}, {dropout_p=})")
    s = torch.matmul(q, k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    if attn_mask is not None:
        s = s + attn_mask
    p = torch.softmax(s, -1)
    if nan_safe:
        p = torch.where(torch.isnan(p), torch.zeros_like(p), p)
    return torch.matmul(p, v)


def _rms_norm_decomposed(x, normalized_shape, weight=None, eps=None):
    """aten::rms_norm has no opset-17 symbolic; the same formula in basic ops."""
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


@contextlib.contextmanager
def _export_functions(nan_safe: bool = True):
    """Swap in exportable SDPA and RMSNorm while tracing (torch.nn.functional is restored after;
    a thread running the model meanwhile gets the same numbers through the slower spelled-out ops)."""
    orig = F.scaled_dot_product_attention, F.rms_norm
    F.scaled_dot_product_attention = functools.partial(_sdpa_nan_safe, nan_safe=nan_safe)
    F.rms_norm = _rms_norm_decomposed
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.rms_norm = orig


class _PrefillGraph(nn.Module):
    def __init__(self, model: SIDTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Tensor, src_mask: Tensor):
        p = self.model.prefill(src, src_mask)
        return (*p.keys, *p.values, p.mask)


class _StepGraph(nn.Module):
    """One level's decoder step as a function of plain tensors (see module docstring)."""

    def __init__(self, model: SIDTransformer, step: int) -> None:
        super().__init__()
        self.model, self.step = model, step

    def forward(self, tokens: Tensor, src_len: Tensor, mask: Tensor, *kv: Tensor):
        m, step, n = self.model, self.step, len(self.model.decoder)
        pks, pvs = list(kv[:n]), list(kv[n: 2 * n])
        K = tokens.shape[1]
        if step > 0:  # cache (B, Kmax, H, L, dh): this step reads beams [0, K), positions [0, step)
            cks = [c[:, :K, :, :step] for c in kv[2 * n: 3 * n]]
            cvs = [c[:, :K, :, :step] for c in kv[3 * n: 4 * n]]
        else:
            cks = cvs = [None] * n
        if m.cfg.arch == "encoder_decoder":
            x = m.tok_emb(tokens) + m.dec_pos.weight[step]
        else:
            pos = (src_len + step).clamp(max=m.pos.num_embeddings - 1)
            x = m.tok_emb(tokens) + m.pos(pos)[:, None, :]
        w = pack_weights(m, torch.float32)
        mask, pvs = context_mask(m.cfg, mask, pvs)
        logits, ks, vs = decoder_layers(m.cfg, w, x, pks, pvs, mask, cks, cvs, step)
        return (logits, *ks, *vs)


@dataclass
class DenseBeamCache:
    """The step graphs' per-beam cache, preallocated for L steps: (B, K, H, L, dh) per layer, fp32."""

    keys: list[Tensor]
    values: list[Tensor]

    @classmethod
    def new(cls, cfg, batch: int, beams: int) -> "DenseBeamCache":
        shape = (batch, beams, cfg.n_heads, cfg.num_levels, cfg.d_head)
        n = cfg.n_dec_layers
        return cls([torch.empty(shape) for _ in range(n)], [torch.empty(shape) for _ in range(n)])

    def reorder(self, parents: Tensor, length: int) -> None:
        """Make beam j of the next step continue from beam parents[:, j]; positions [0, length) move."""
        B, k_new = parents.shape
        k_max = self.keys[0].shape[1]
        if k_new > k_max:
            raise ValueError(f"cache holds {k_max} beams, asked for {k_new}")
        flat = (parents + torch.arange(B)[:, None] * k_max).reshape(-1)  # (B*K',)
        for c in self.keys + self.values:
            g = c.view(B * k_max, *c.shape[2:])[:, :, :length].index_select(0, flat)  # a copy: safe to write back
            c[:, :k_new, :, :length] = g.view(B, k_new, *g.shape[1:])


def _cache_key(model: SIDTransformer) -> str:
    import onnx
    import onnxruntime

    h = hashlib.sha256()
    h.update(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
    h.update(f"{EXPORT_VERSION}/{torch.__version__}/{onnx.__version__}/{onnxruntime.__version__}".encode())
    for mod in ("transformer.py", "decode.py", "onnx_backend.py"):  # the traced code is part of the key
        h.update((Path(__file__).parent / mod).read_bytes())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SIDREC_CACHE", Path.home() / ".cache" / "sidrec")) / "onnx"


def export_onnx(model: SIDTransformer, out_dir: str | Path) -> Path:
    """Write prefill.onnx and step{l}.onnx for l in 0..L-1 into out_dir (atomically per file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("ONNX export expects an fp32 model")
    was_training = model.training
    model.eval()
    try:
        _export_all(model, out)
    finally:
        model.train(was_training)
    (out / "done").write_text("ok\n")
    return out


def _export_all(model: SIDTransformer, out: Path) -> None:
    cfg, n = model.cfg, len(model.decoder)
    B, K, T = 2, 3, 2 * cfg.num_levels
    g = torch.Generator().manual_seed(0)  # example inputs only; leaves the global RNG alone
    src = torch.randint(2, cfg.layout.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, : cfg.num_levels] = False
    io = dict(dynamo=False, opset_version=OPSET, do_constant_folding=True)
    kv_names = [f"{p}{i}" for p in ("pk", "pv") for i in range(n)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tmp = out / "prefill.onnx.tmp"
        with _export_functions(nan_safe=True):
            torch.onnx.export(_PrefillGraph(model).eval(), (src, mask), str(tmp), input_names=["src", "src_mask"],
                              output_names=kv_names + ["mask"],
                              dynamic_axes={"src": {0: "B", 1: "T"}, "src_mask": {0: "B", 1: "T"},
                                            **{k: {0: "B", 2: "T"} for k in kv_names}, "mask": {0: "B", 3: "T"}},
                              **io)
        os.replace(tmp, out / "prefill.onnx")
        prefix = model.prefill(src, mask)
        cache = DenseBeamCache.new(cfg, B, K)
        for c in cache.keys + cache.values:
            c.normal_(generator=g)
        tokens = torch.randint(2, cfg.layout.vocab_size, (B, K), generator=g)
        src_len = mask.sum(1)
        for step in range(cfg.num_levels):
            c_names = [f"{p}{i}" for p in ("ck", "cv") for i in range(n)] if step > 0 else []
            args = (tokens, src_len, prefix.mask, *prefix.keys, *prefix.values,
                    *((cache.keys + cache.values) if step > 0 else []))
            outs = ["logits"] + [f"{p}{i}" for p in ("k", "v") for i in range(n)]
            dyn = {"tokens": {0: "B", 1: "K"}, "src_len": {0: "B"}, "mask": {0: "B", 3: "T"},
                   **{k: {0: "B", 2: "T"} for k in kv_names}, **{k: {0: "B", 1: "Kmax"} for k in c_names},
                   "logits": {0: "B", 1: "K"}, **{k: {0: "B", 1: "K"} for k in outs[1:]}}
            tmp = out / f"step{step}.onnx.tmp"
            with _export_functions(nan_safe=False):
                torch.onnx.export(_StepGraph(model, step).eval(), args, str(tmp),
                                  input_names=["tokens", "src_len", "mask"] + kv_names + c_names,
                                  output_names=outs, dynamic_axes=dyn, **io)
            os.replace(tmp, out / f"step{step}.onnx")


def _np(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


class OnnxDecoder:
    """onnxruntime sessions behind the `Decoder` protocol of `model.beam_search` (CPU, fp32)."""

    def __init__(self, model_dir: str | Path, cfg, num_threads: int | None = None) -> None:
        import onnxruntime as ort

        self.cfg = cfg
        self.offsets = cfg.layout.offsets
        self.n_layers = cfg.n_dec_layers
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = num_threads or torch.get_num_threads()
        so.inter_op_num_threads = 1
        # Spinning worker threads make a shared CPU (other processes runnable) many times slower.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        d = Path(model_dir)
        prov = ["CPUExecutionProvider"]
        self.prefill_sess = ort.InferenceSession(str(d / "prefill.onnx"), so, providers=prov)
        self.step_sess = [ort.InferenceSession(str(d / f"step{l}.onnx"), so, providers=prov)
                          for l in range(cfg.num_levels)]
        self.step_inputs = [{i.name for i in s.get_inputs()} for s in self.step_sess]

    @classmethod
    def from_model(cls, model: SIDTransformer, cache_dir: str | Path | None = None,
                   num_threads: int | None = None) -> "OnnxDecoder":
        """Export (or reuse a previous export of) `model` and open sessions on it."""
        d = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        d = d / _cache_key(model)
        if not (d / "done").exists():
            export_onnx(model, d)
        return cls(d, model.cfg, num_threads)

    def prefill(self, src: Tensor, src_mask: Tensor) -> Prefix:
        outs = self.prefill_sess.run(None, {"src": _np(src.long()), "src_mask": _np(src_mask.bool())})
        t = [torch.from_numpy(o) for o in outs]
        n = self.n_layers
        return Prefix(t[:n], t[n: 2 * n], t[2 * n])

    def new_cache(self, batch: int, beams: int, device: torch.device, dtype: torch.dtype) -> "DenseBeamCache":
        return DenseBeamCache.new(self.cfg, batch, beams)  # fp32: the graphs are exported in fp32

    def decode_step(self, prefix: Prefix, cache: "DenseBeamCache", tokens: Tensor, step: int,
                    src_len: Tensor | None = None) -> Tensor:
        n = self.n_layers
        feed = {"tokens": _np(tokens.long()), "mask": _np(prefix.mask.float())}
        if src_len is not None:
            feed["src_len"] = _np(src_len.long())
        for i in range(n):
            feed[f"pk{i}"], feed[f"pv{i}"] = _np(prefix.keys[i].float()), _np(prefix.values[i].float())
            if step > 0:
                feed[f"ck{i}"], feed[f"cv{i}"] = _np(cache.keys[i]), _np(cache.values[i])
        names = self.step_inputs[step]
        outs = self.step_sess[step].run(None, {k: v for k, v in feed.items() if k in names})
        K = tokens.shape[1]
        for i in range(n):  # this step's K/V into the dense cache
            cache.keys[i][:, :K, :, step] = torch.from_numpy(outs[1 + i])
            cache.values[i][:, :K, :, step] = torch.from_numpy(outs[1 + n + i])
        return torch.from_numpy(outs[0])
