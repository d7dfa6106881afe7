"""The SID transformer: a TIGER-style encoder-decoder and a decoder-only variant over SID tokens.

Both architectures expose the same two decoding entry points used by `model.beam_search`:

* `prefill(src, src_mask)` runs the history once and returns a `Prefix` holding the per-layer
  keys/values every beam of a request attends to (the encoder's cross-attention K/V, or the
  decoder-only model's history cache). Beams index into it; nothing is copied per beam.
* `decode_step(prefix, cache, tokens, step)` advances all beams by one SID level, appending the
  new self-attention K/V to the search's `BeamCache`, and returns logits over
  that level's codebook only (each level owns a disjoint vocabulary slice). Its fast path (packed
  weights, bf16 under autocast, beam chunking) lives in `model.decode`; `forward` stays the
  training definition it is tested against.

It is not a general language model: the decoder only ever generates the L codes of one item.
Layer layout is pre-norm (RMSNorm), no biases, GELU feed-forward, tied input/output embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sidrec.model.config import BOS_ID, PAD_ID, ModelConfig
from sidrec.model.decode import BeamCache, FirstStep, compute_dtype, decode_weights, prefill_decoder_only, run_decoder


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        p = cfg.dropout if cfg.ff_dropout is None else cfg.ff_dropout
        self.drop = nn.Dropout(p) if p > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.drop(F.gelu(self.up(x))))


class Attention(nn.Module):
    """Multi-head attention with T5's head size (heads * d_head need not equal d_model)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.h, self.dh = cfg.n_heads, cfg.d_head
        inner = cfg.n_heads * cfg.d_head
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.p_drop = cfg.dropout if cfg.attn_dropout is None else cfg.attn_dropout

    def split(self, x: Tensor) -> Tensor:  # (B, T, H*dh) -> (B, H, T, dh)
        return x.unflatten(-1, (self.h, self.dh)).transpose(1, 2)

    def merge(self, x: Tensor) -> Tensor:  # (B, H, T, dh) -> (B, T, H*dh)
        return x.transpose(1, 2).flatten(2)

    def kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.split(self.k(x)), self.split(self.v(x))

    def forward(self, x: Tensor, mem: Tensor | None = None, mask: Tensor | None = None,
                causal: bool = False) -> Tensor:
        q = self.split(self.q(x))
        k, v = self.kv(x if mem is None else mem)
        p = self.p_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        return self.o(self.merge(out))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n1, self.attn = RMSNorm(cfg.d_model), Attention(cfg)
        self.n2, self.ff = RMSNorm(cfg.d_model), FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor | None, causal: bool = False) -> Tensor:
        x = x + self.drop(self.attn(self.n1(x), mask=mask, causal=causal))
        return x + self.drop(self.ff(self.n2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n1, self.self_attn = RMSNorm(cfg.d_model), Attention(cfg)
        self.n2, self.cross = RMSNorm(cfg.d_model), Attention(cfg)
        self.n3, self.ff = RMSNorm(cfg.d_model), FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mem: Tensor, mem_mask: Tensor | None) -> Tensor:
        x = x + self.drop(self.self_attn(self.n1(x), causal=True))
        x = x + self.drop(self.cross(self.n2(x), mem=mem, mask=mem_mask))
        return x + self.drop(self.ff(self.n3(x)))


@dataclass
class Prefix:
    """Per-request state shared by all beams: one (K, V) pair per decoder layer, (B, H, T, dh)."""

    keys: list[Tensor]
    values: list[Tensor]
    mask: Tensor  # (B, 1, 1, T) additive float mask: 0 for real tokens, -inf for padding
    first: FirstStep | None = None  # decoder-only: step 0, computed with the history


def _additive_mask(src_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, T) bool keep-mask -> (B, 1, 1, T) additive mask (0 or -inf)."""
    m = torch.zeros(src_mask.shape, dtype=dtype, device=src_mask.device)
    m = m.masked_fill(~src_mask, float("-inf"))
    return m[:, None, None, :]


class SIDTransformer(nn.Module):
    """Generates an item's L SID codes from a history of SID tokens."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        lay = cfg.layout
        self.L = lay.num_levels
        self.offsets = lay.offsets
        self.cards = lay.cardinalities
        D = cfg.d_model
        self.tok_emb = nn.Embedding(lay.vocab_size, D, padding_idx=PAD_ID)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.arch == "encoder_decoder":
            # Encoder positions count from the most recent token backwards, so recency keeps its
            # meaning whatever the history length (histories are left-padded).
            self.enc_pos = nn.Embedding(cfg.max_source_tokens, D)
            self.dec_pos = nn.Embedding(self.L, D)
            self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_enc_layers))
            self.enc_norm = RMSNorm(D)
            self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_dec_layers))
        else:
            # Decoder-only: history tokens then the target's codes in one causal stream.
            self.pos = nn.Embedding(cfg.max_source_tokens + self.L, D)
            self.decoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_dec_layers))
        self.dec_norm = RMSNorm(D)
        self.apply(self._init)
        # T5's initialisation of tied embeddings: unit variance, so that the d^-0.5-scaled output
        # logits start at O(1). With the usual 0.02 the logits start ~50x too small and the model
        # spent a whole Beauty epoch near the uniform loss (measured: 17.0 vs 15.3 after 90 steps).
        nn.init.normal_(self.tok_emb.weight, std=1.0)
        with torch.no_grad():
            self.tok_emb.weight[PAD_ID].zero_()
        for name in ("enc_pos", "dec_pos", "pos"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name).weight, std=0.5)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    # ---- shared pieces -------------------------------------------------------------------
    def level_logits(self, h: Tensor, level: int) -> Tensor:
        """h (..., D) -> logits over level `level`'s codebook (..., C_l), tied to the embeddings."""
        w = self.tok_emb.weight[self.offsets[level]: self.offsets[level] + self.cards[level]]
        return F.linear(h, w) * (self.cfg.d_model ** -0.5)

    def code_tokens(self, codes: Tensor) -> Tensor:
        """codes (..., L') at levels 0..L'-1 -> token ids."""
        off = torch.tensor(self.offsets[: codes.shape[-1]], device=codes.device)
        return codes + off

    # ---- encoder-decoder ------------------------------------------------------------------
    def encode(self, src: Tensor, src_mask: Tensor) -> Tensor:
        """src (B, T) token ids, left-padded; src_mask (B, T) bool. -> memory (B, T, D)."""
        T = src.shape[1]
        pos = torch.arange(T, device=src.device).flip(0)  # T-1 .. 0 (flip: exports with a dynamic T)
        x = self.drop(self.tok_emb(src) + self.enc_pos(pos))
        mask = _additive_mask(src_mask, x.dtype)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.enc_norm(x)

    def forward(self, src: Tensor, src_mask: Tensor, tgt_codes: Tensor, *, packed: tuple[Tensor, Tensor] | None = None
                ) -> list[Tensor]:
        """Teacher-forced training pass. tgt_codes (B, L) -> per-level logits [(B, C_l)].

        With `packed=(pos, branch)`, src/src_mask are a packed batch's tokens and additive mask
        and the call is `forward_packed` (routed through here so that DDP sees it)."""
        if packed is not None:
            return self.forward_packed(src, packed[0], src_mask, packed[1])
        if self.cfg.arch == "decoder_only":
            return self._forward_decoder_only(src, src_mask, tgt_codes)
        mem = self.encode(src, src_mask)
        B = src.shape[0]
        dec_in = torch.cat([torch.full((B, 1), BOS_ID, device=src.device, dtype=src.dtype),
                            self.code_tokens(tgt_codes[:, :-1])], dim=1)  # (B, L)
        x = self.drop(self.tok_emb(dec_in) + self.dec_pos.weight[None])
        mask = _additive_mask(src_mask, x.dtype)
        for layer in self.decoder:
            x = layer(x, mem, mask)
        h = self.dec_norm(x)  # (B, L, D)
        return [self.level_logits(h[:, l], l) for l in range(self.L)]

    # ---- decoder-only ---------------------------------------------------------------------
    def _positions(self, src_mask: Tensor) -> Tensor:
        """Absolute positions counted from the first real token (left padding gets 0)."""
        return (src_mask.long().cumsum(1) - 1).clamp(min=0)

    def _forward_decoder_only(self, src: Tensor, src_mask: Tensor, tgt_codes: Tensor) -> list[Tensor]:
        B, T = src.shape
        dec_in = torch.cat([src, torch.full((B, 1), BOS_ID, device=src.device, dtype=src.dtype),
                            self.code_tokens(tgt_codes[:, :-1])], dim=1)  # (B, T+L)
        keep = torch.cat([src_mask, torch.ones(B, self.L, dtype=torch.bool, device=src.device)], 1)
        pos = self._positions(keep)
        x = self.drop(self.tok_emb(dec_in) + self.pos(pos))
        causal = torch.ones(T + self.L, T + self.L, dtype=torch.bool, device=src.device).tril()
        allowed = causal[None] & keep[:, None, :]
        allowed = allowed | torch.eye(T + self.L, dtype=torch.bool, device=src.device)[None]
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
        mask = mask[:, None]  # (B, 1, S, S)
        for layer in self.decoder:
            x = layer(x, mask)
        h = self.dec_norm(x[:, T:])  # (B, L, D)
        return [self.level_logits(h[:, l], l) for l in range(self.L)]

    def forward_packed(self, tokens: Tensor, pos: Tensor, mask: Tensor, branch: Tensor) -> list[Tensor]:
        """Decoder-only training over packed samples (see `training.packing`): tokens/pos (B, S),
        additive mask (B, 1, S, S), branch (T, L) indices of each target's BOS..c_{L-2} tokens in
        the flattened stream. -> per-level logits [(T, C_l)], as `forward` gives per window."""
        if self.cfg.arch != "decoder_only":
            raise ValueError("packed training needs arch='decoder_only'")
        x = self.drop(self.tok_emb(tokens) + self.pos(pos))
        mask = mask.to(x.dtype)
        for layer in self.decoder:
            x = layer(x, mask)
        h = self.dec_norm(x.flatten(0, 1)[branch])  # (T, L, D)
        return [self.level_logits(h[:, l], l) for l in range(self.L)]

    # ---- cached decoding (used by beam search) ---------------------------------------------
    @torch.no_grad()
    def prefill(self, src: Tensor, src_mask: Tensor) -> Prefix:
        """Run the history once. src (B, T) left-padded tokens; src_mask (B, T) bool."""
        if self.cfg.arch == "encoder_decoder":
            mem = self.encode(src, src_mask)
            ks, vs = zip(*(layer.cross.kv(mem) for layer in self.decoder))
            return Prefix(list(ks), list(vs), _additive_mask(src_mask, mem.dtype))
        B = src.shape[0]
        bos = torch.full((B, 1), BOS_ID, dtype=src.dtype, device=src.device)
        pos = torch.cat([self._positions(src_mask), src_mask.sum(1, keepdim=True)], 1)  # BOS at src_len
        x = self.tok_emb(torch.cat([src, bos], 1)) + self.pos(pos.clamp(max=self.pos.num_embeddings - 1))
        dtype = compute_dtype(src.device)
        with torch.autocast(src.device.type, enabled=False):
            ks, vs, first = prefill_decoder_only(self, decode_weights(self, dtype), x.float(), src_mask)
        return Prefix(ks, vs, _additive_mask(src_mask, torch.float32), first)

    def new_cache(self, batch: int, beams: int, device: torch.device, dtype: torch.dtype) -> BeamCache:
        """An empty per-search cache; each decode step appends its position's K/V (see `BeamCache`).
        The shape arguments are those of the `Decoder` protocol: this cache needs none of them."""
        return BeamCache.empty(len(self.decoder))

    @torch.no_grad()
    def decode_step(self, prefix: Prefix, cache: BeamCache, tokens: Tensor, step: int,
                    src_len: Tensor | None = None) -> Tensor:
        """Advance K beams by one level. tokens (B, K): the previous level's token (BOS at step 0;
        the decoder-only model computed that step in `prefill` and only hands it out here).

        Returns fp32 logits (B, K, C_step) over the codebook of level `step`.
        src_len (B,) real history lengths, needed only by the decoder-only variant's positions.
        Runs its matmuls in the autocast dtype (bf16; fp16 on CUDA) when called under autocast,
        with the residual stream, norms and softmax in fp32.
        """
        dtype = compute_dtype(tokens.device)
        if step == 0 and prefix.first is not None:  # decoder-only: the prefill already ran BOS
            if cache.length:
                raise ValueError(f"decode step 0 needs an empty cache, it holds {cache.length} positions")
            cache.append(prefix.first.keys, prefix.first.values)  # one position shared by every beam
            return prefix.first.logits.expand(-1, tokens.shape[1], -1)
        if self.cfg.arch == "encoder_decoder":
            x = self.tok_emb(tokens) + self.dec_pos.weight[step]  # (B, K, D)
        else:
            if src_len is None:
                raise ValueError("decoder-only decode_step needs src_len")
            pos = (src_len + step).clamp(max=self.pos.num_embeddings - 1)  # (B,)
            x = self.tok_emb(tokens) + self.pos(pos)[:, None, :]
        with torch.autocast(tokens.device.type, enabled=False):
            return run_decoder(self, decode_weights(self, dtype), x.float(), prefix, cache, step)
