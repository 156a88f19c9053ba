"""
The music transformer, the network and nothing else: a decoder-only, reversible FAVOR+ transformer over
the 4 Encodec codebooks, predicting them in parallel (or with MusicGen's delays), cross-attending to a
label encoded by a frozen BERT-family model (checkpoint.TextEncoder).

- Causal FAVOR+ is computed chunk by chunk (masked products inside a chunk, a running state between
  chunks), in float32, and is strictly causal: the softmax kernel uses a running maximum as its
  stabiliser, never a maximum over the whole sequence.
- Decoding is recurrent: prefill(tokens, text) runs the prompt once and keeps each layer's state (FAVOR+
  sums, a ring of the local heads' last keys and values, the previous token for token shifting), then
  step(tokens) costs the same at every position. The state is fixed tensors updated in place.
- Reversible layers (y1 = x1 + f(x2), y2 = x2 + g(y1)) keep no activations; the backward pass rebuilds
  them with the same dropout masks and the same random features.

Sampling, and the faster forms of a few functions that decoding swaps in, are in decoding.py; saving and
loading, in checkpoint.py. Where to change what: README.md, "Changing the model".
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass, fields

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
    positions: str = "relative"        # relative (rotary on the local heads only) | absolute (sinusoid + rotary everywhere)
    ff_mult: int = 2
    ff_chunks: int = 2                 # feed-forward computed in this many chunks along time (memory)
    dropout: float = 0.1
    rezero: bool = True                # ReZero residual gates (no LayerNorm inside blocks)
    shift_tokens: bool = True          # half the features of each position come from the previous one
    reversible: bool = True
    global_text: bool = True           # also add the label's pooled state to every step's input (global conditioning)
    text_dim: int = 384                # width of the text encoder's states
    feature_redraw_interval: int = 1000  # training steps between random-feature redraws (0: never)
    chunk_size: int = 128              # FAVOR+ chunk length
    seed: int = 0                      # seed of the random features

    @classmethod
    def from_dict(cls, d):
        """Settings from a mapping, checked (validate); keys it does not know are ignored, missing ones take
        the defaults (checkpoint.model_config fills what an old checkpoint predates first)."""
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
        for name, interval in RANGES.items():
            low, high = (float(x) for x in interval[1:-1].split(","))
            value = getattr(self, name)
            if not ((low < value or interval[0] == "[" and value == low) and (value < high or interval[-1] == "]" and value == high)):
                raise ValueError(f"{name}={value} is out of range: it must be in {interval}")
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
        return (self.n_q * (self.vocab + 1) * dim + linear(self.text_dim, dim) * (2 if self.global_text else 1)
                + self.depth * layer + 2 * dim + linear(dim, self.n_q * self.vocab))


_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a text"}
# what each numeric setting accepts, in interval notation (deploy.py checks a new run's settings with them)
RANGES = dict(n_q="[1, 32]", vocab="[2, 65536]", dim="[2, 16384]", depth="[1, 512]", heads="[1, 256]", dim_head="[2, 1024]",
              nb_features="[1, 16384]", local_heads="[0, 256]", local_window="[1, 1000000]", max_len="[1, 100000000]",
              ff_mult="[1, 64]", ff_chunks="[1, 1024]", dropout="[0, 1)", text_dim="[1, 65536]",
              feature_redraw_interval="[0, inf)", chunk_size="[1, 65536]", seed="[0, inf)")


# the settings of deploy.py that shape the model (the rest of ModelConfig comes from the data and the run)
MODEL_SETTINGS = [f.name for f in fields(ModelConfig) if f.name not in ("n_q", "vocab", "text_dim", "chunk_size", "seed")]


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


def favor_features(x, projection, kernel, is_query, key_mask=None):
    """FAVOR+ feature maps φ of x (..., T, d) through the random projection W (F, d), in float32, with the
    scale s = d^-¼: generalized, φ(x) = relu(s·x Wᵀ) + 1e-3; softmax, φ(x) = exp(s·x Wᵀ - s²|x|²/2 - m).
    Returns (features (..., T, F), stabiliser m or None)."""
    x = x.float() * x.shape[-1] ** -0.25
    return feature_map(x, x @ projection.t(), kernel, is_query, key_mask)


def feature_map(x, xw, kernel, is_query, key_mask=None):
    """φ from the scaled x and its projection xw = s·x Wᵀ (favor_features). Softmax-kernel key features are
    exp(a_j - m_j) with m_j the running maximum over positions <= j (causal; for non-causal use with a
    key_mask, the maximum over the unmasked keys). Query stabilisers cancel between numerator and
    denominator, so each query uses its own maximum."""
    if kernel == "generalized":
        return F.relu(xw) + FEATURE_FLOOR, None
    a = xw - 0.5 * x.pow(2).sum(-1, keepdim=True)
    if is_query:
        return torch.exp(a - a.amax(-1, keepdim=True)), None
    peak = a.amax(-1)                                                # (..., T)
    if key_mask is not None:
        m = peak.masked_fill(~key_mask, float("-inf")).amax(-1, keepdim=True).expand_as(peak)
    else:
        m = peak.cummax(-1).values
    return torch.exp(a - m.unsqueeze(-1)), m


def add_outer(s, ve, kf):
    """The FAVOR+ state update of a decoding step, in place: s (B, H, D+1, F) += [v | 1]ᵀ φ(k), for
    ve = [v | 1] (B, H, 1, D+1) and kf = φ(k) (B, H, 1, F); float32 sums."""
    s.addcmul_(ve.transpose(-1, -2), kf)


def attend(q, k, v, mask):
    """softmax(q kᵀ / √d + mask) v for (B, H, T, d) queries, (B, H, S, d) keys and values and an additive
    mask (T, S): a decoding step's exact attention over its stored keys."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


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
    """What the two attention modules share when they use FAVOR+: the random features (a buffer, redrawn in
    training and saved with the model) and the feature map (favor_features; decoding.py swaps in a faster
    form of it for the decoding copy)."""
    feature_map = staticmethod(favor_features)

    def keep_features(self, cfg):
        self.register_buffer("projection", torch.zeros(cfg.nb_features, cfg.dim_head))

    def features(self, x, is_query, key_mask=None):
        return self.feature_map(x, self.projection, self.cfg.kernel, is_query, key_mask)


class SelfAttention(FavorHeads):
    """Causal self-attention: FAVOR+ heads (or exact ones, attention=softmax) and local_heads heads of exact
    attention over the last local_window positions; rotary positions on the heads that see positions."""
    attend = staticmethod(attend)        # a step's exact attention over its stored keys, and its FAVOR+ state
    add_outer = staticmethod(add_outer)  # update (decoding.py swaps in other forms of both for its decoding copy)

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.h, self.d = cfg, cfg.heads, cfg.dim_head
        self.n_global = cfg.heads - cfg.local_heads
        self.to_qkv = nn.Linear(cfg.dim, 3 * cfg.heads * cfg.dim_head)
        self.to_out = nn.Linear(cfg.heads * cfg.dim_head, cfg.dim)
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
                s, ve = state["s"], _with_ones(v)                        # (B, H, 1, D+1); addcmul_ sums in float32
                if softmax:
                    m_new = torch.maximum(state["m"], m[..., 0])           # (B, H)
                    s.mul_(torch.exp(state["m"] - m_new)[..., None, None])
                    kf = kf * torch.exp(m[..., 0] - m_new)[..., None, None]
                    state["m"].copy_(m_new)
                self.add_outer(s, ve, kf)                                # Σ [v | 1]ᵀ φ(k), in place
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
            return self.attend(q, state["k"], state["v"], ctx["seen"])
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
            return self.attend(q, state["local_k"], state["local_v"], ctx["ring"])
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
        self.to_q = nn.Linear(cfg.dim, cfg.heads * cfg.dim_head)
        self.to_kv = nn.Linear(cfg.dim, 2 * cfg.heads * cfg.dim_head)
        self.to_out = nn.Linear(cfg.heads * cfg.dim_head, cfg.dim)
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
        self.net = nn.Sequential(nn.Linear(cfg.dim, cfg.dim * cfg.ff_mult), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.dim * cfg.ff_mult, cfg.dim))

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
        self.compiled = None   # (f, g) to call instead in the reversible training pass (train.compile_for_training)

    def __getstate__(self):    # a copy (the EMA model's) gets none: those branches hold the original's weights
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
        self.text_global = nn.Linear(cfg.text_dim, cfg.dim) if cfg.global_text else None
        blocks = []
        for _ in range(cfg.depth):
            blocks.append(ReversibleBlock(Residual(cfg, SelfAttention(cfg), shift=True), Residual(cfg, FeedForward(cfg), shift=True)))
            blocks.append(ReversibleBlock(Residual(cfg, CrossAttention(cfg), shift=False), Residual(cfg, FeedForward(cfg), shift=False)))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.n_q * cfg.vocab)   # the n_q output heads, as one matmul
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

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def _embed(self, tokens, positions, text_bias=None):
        """tokens (B, n_q, T) at `positions` (T,) → (B, T, dim), and the rotary table. text_bias (B, 1, dim):
        the global text conditioning, added to every step."""
        x = self.embed[0](tokens[:, 0])
        for k in range(1, self.cfg.n_q):
            x = x + self.embed[k](tokens[:, k])
        if self.cfg.positions == "absolute":
            x = x + sinusoid(positions, self.embed_freqs, x.dtype)
        if text_bias is not None:
            x = x + text_bias
        return self.drop(x), rotary_table(positions, self.rotary_freqs, x.dtype)

    def _text_bias(self, text, text_mask):
        """Global conditioning: the mean of the label's states over its tokens, projected, (B, 1, dim); None
        without global_text."""
        if self.text_global is None:
            return None
        mask = text_mask[..., None].to(text.dtype)
        pooled = (text * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1)
        return self.text_global(pooled.to(self.text_global.weight.dtype))

    def _logits(self, x):
        x = self.norm(x)
        b, t, _ = x.shape
        return self.head(x).view(b, t, self.cfg.n_q, self.cfg.vocab).permute(0, 2, 1, 3)  # (B, n_q, T, vocab)

    def forward(self, tokens, text, text_mask, start=0):
        """tokens (B, n_q, T) in 0..vocab (vocab = start), text (B, L, text_dim), text_mask (B, L) bool
        → logits (B, n_q, T, vocab). start: the position of the first token (positions start..start+T-1)."""
        x, rot = self._embed(tokens, torch.arange(start, start + tokens.shape[-1], device=tokens.device),
                             self._text_bias(text, text_mask))
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
        token-shift input, the text's keys and values (and its global bias); the position, as a tensor; and the additive masks of
        step's attention, (1, slots): 0 on the key slots written so far, -inf on the others, kept up to date
        by one operation a step."""
        unwritten = lambda n: torch.full((1, n), float("-inf"), dtype=dtype, device=device)
        state = dict(pos=torch.zeros(1, dtype=torch.long, device=device), ring=unwritten(self.cfg.local_window))
        if self.cfg.attention == "softmax":
            state["seen"] = unwritten(self.window())
        if self.cfg.global_text:
            state["text_bias"] = torch.zeros(batch, 1, self.cfg.dim, dtype=dtype, device=device)
        return dict(state, layers=[(block.f.init_state(batch, device, dtype, self.window()),
                             block.g.init_state(batch, device, dtype, self.window())) for block in self.blocks])

    @torch.no_grad()
    def prefill(self, tokens, text, text_mask, state):
        """Run a prompt (B, n_q, T) through the chunked (parallel) form, writing the state it ends in;
        returns the last position's logits (B, n_q, vocab)."""
        bias = self._text_bias(text, text_mask)
        if bias is not None:
            _keep(state, "text_bias", bias)            # once per prompt, added at every step
        x, rot = self._embed(tokens, torch.arange(tokens.shape[-1], device=tokens.device), bias)
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
        x, rot = self._embed(tokens[..., None], pos, state.get("text_bias"))
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


def codebook_loss(logits, targets):
    """Mean cross-entropy over the codebooks (each averaged over its valid targets; targets < 0 are
    ignored). Returns (loss, per-codebook losses (n_q,) detached)."""
    valid = targets >= 0
    per = F.cross_entropy(logits.float().flatten(0, 2), targets.clamp_min(0).flatten(), reduction="none").view(targets.shape)
    per_codebook = (per * valid).sum((0, 2)) / valid.sum((0, 2)).clamp_min(1)
    return per_codebook.mean(), per_codebook.detach()
