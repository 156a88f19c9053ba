"""
Decoding: the sampler, generate() (any length, streamed as it is made), the Decoder that runs a model's
step eagerly, as a CUDA graph or compiled, and the decoding copy of a model (for_decoding) with the faster
forms of a few of its functions swapped in, as gpt-fast's quantize.py swaps its Linear layers: the network
in model.py stays the plain math, and the tests check each fast form against its plain one.

The fast forms (BENCHMARKS.md has the measurements behind each):
- RowLinear: a linear layer given a few rows without gradient on a CPU, computed weight-first (W @ xᵀ) in
  eager mode, where the BLAS reads the weights fastest, and under torch.compile as one multiply-and-sum
  per row, which inductor makes one pass over the weights at about the memory's rate.
- favor_features: the generalized kernel's relu(s·x Wᵀ) + f as max(s·x Wᵀ + f, f), one product that also
  scales and offsets and a clamp (two kernels for a CUDA graph, where there were four); under torch.compile
  on a CPU the small products as sums that inductor fuses.
- add_outer: the FAVOR+ state update with φ(k) stored first under torch.compile (inductor 2.11 otherwise
  computes that update wrong on a CPU).
- attend: under torch.compile on a CPU, the step's attention as sums; eager, its query made contiguous
  (RowLinear's rows are a transposed product: SDPA's fused kernels need a last stride of 1).
"""
import functools
import logging
import shutil
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import model as M
from model import UNKNOWN, as_input, inputs_from_targets, to_layout


# -----------------------------------------------------------------------------
# the decoding copy of a model, with its fast forms

def _fused_on_cpu(x):
    """Whether a decoding step's small products are better written as multiply-and-sums: under
    torch.compile on a CPU, where inductor fuses them into a few kernels (for RowLinear one pass over the
    weights; for the feature map and attend it saves library calls that cost more than the products)."""
    return torch.compiler.is_compiling() and x.device.type == "cpu" and not torch.is_grad_enabled()


def _stored(x):
    """x, stored in memory before what uses it, under torch.compile (inductor's own operator for it; there is
    no public one): otherwise inductor may recompute x inside each loop that reads it, or, fused into
    the FAVOR+ state update, compute it wrong (inductor 2.11, CPU)."""
    if not torch.compiler.is_compiling():
        return x
    from torch._inductor import inductor_prims
    return inductor_prims.force_stride_order(x, x.stride())


class RowLinear(nn.Linear):
    """nn.Linear, with the CPU's matrix-vector products of decoding (a few rows, no gradient) in the form
    that reads the weights fastest (BENCHMARKS.md). Compiled: one multiply-and-sum per row, which inductor
    turns into a single pass over the weights for all rows at about the memory's rate, where the BLAS reads
    these 1-6 MB matrices at two thirds of it. Eager, in float32: weight-first, W @ xᵀ over at least two
    columns (about twice F.linear's speed at one or two rows). Made from an nn.Linear, sharing its weights."""

    @classmethod
    def of(cls, linear):
        fast = cls.__new__(cls)
        fast.__dict__ = linear.__dict__.copy()
        return fast


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


def favor_features(x, projection, kernel, is_query, key_mask=None, floor=None):
    """model.favor_features in fewer kernels (the module's docstring); the same features. floor: the
    generalized kernel's (F,) tensor of FEATURE_FLOOR, kept by the module so that a step makes none."""
    if _fused_on_cpu(x):
        x = x.float() * x.shape[-1] ** -0.25
        return M.feature_map(x, (x.unsqueeze(-2) * projection).sum(-1), kernel, is_query, key_mask)
    if kernel != "generalized":
        return M.favor_features(x, projection, kernel, is_query, key_mask)
    x = x.to(torch.float32, memory_format=torch.contiguous_format)           # one copy for all the heads' product
    xw = torch.addmm(floor, x.reshape(-1, x.shape[-1]), projection.t(), alpha=x.shape[-1] ** -0.25)
    return xw.clamp_min_(M.FEATURE_FLOOR).view(*x.shape[:-1], -1), None


def add_outer(s, ve, kf):
    """model.add_outer with φ(k) stored first under torch.compile: computed inside this update, inductor 2.11
    (CPU) gets it wrong (0.026 off in the logits; a test compares); stored, the update is one pass over the
    sums, as fast as the BLAS call it replaces at batch 1 and faster at batch 2 (BENCHMARKS.md)."""
    s.addcmul_(ve.transpose(-1, -2), _stored(kf))


def attend(q, k, v, mask):
    """model.attend for a decoding step, in the form that is fastest where it runs (the module's docstring)."""
    if _fused_on_cpu(q):
        scores = (q.float().unsqueeze(-2) * k.float().unsqueeze(-3)).sum(-1) * q.shape[-1] ** -0.5 + mask   # (B, H, T, S)
        return (scores.softmax(-1).unsqueeze(-1) * v.float().unsqueeze(-3)).sum(-2).to(q.dtype)
    return F.scaled_dot_product_attention(q if q.stride(-1) == 1 else q.contiguous(), k, v, attn_mask=mask)


@torch.no_grad()
def for_decoding(model, device, dtype):
    """The model, made its decoding copy in place (and returned): on `device`, weights in `dtype`, eval
    mode, each ReZero gate folded into its branch's last linear layer (one multiplication fewer per branch
    and step), and the fast forms above swapped in. The FAVOR+ projections (buffers) stay float32, since
    the features are computed in it. Made for one device: it is not moved afterwards."""
    model.to(device).eval()
    for branch in (b for block in model.blocks for b in (block.f, block.g)):
        if branch.gate is not None:
            layer = branch.layer
            last = layer.net[-1] if isinstance(layer, M.FeedForward) else layer.to_out
            last.weight.mul_(branch.gate)
            last.bias.mul_(branch.gate)
            branch.gate = None
    for p in model.parameters():
        p.data = p.data.to(dtype)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Linear:
                setattr(module, name, RowLinear.of(child))
        if isinstance(module, M.FavorHeads):
            module.register_buffer("floor", torch.full(module.projection.shape[:1], M.FEATURE_FLOOR, device=device),
                                   persistent=False)
            module.feature_map = functools.partial(favor_features, floor=module.floor)
        if isinstance(module, M.SelfAttention):
            module.attend, module.add_outer = attend, add_outer
    model.decoding_copy = True
    return model


# -----------------------------------------------------------------------------
# sampling: one sampler for generate.py, the app and the samples written during training

# the sampling of a model whose run has not chosen its own (training's samples until its last evaluation,
# generate.py and app.py for such a model): no truncation, guidance 2 (BENCHMARKS.md, "Sampling"). Truncating
# 1024-code codebooks (top-k 250 or 50, top-p 0.9, temperature 0.9) makes samples further from the real clips
# than unigram noise; guidance follows the label better up to 2-3 at a small cost in closeness.
SAMPLING = dict(top_k=0, top_p=1.0, temperature=1.0, cfg=2.0)


def default_sampling(cond_dropout):
    """SAMPLING, without guidance for a model trained with cond_dropout=0 (it has no unconditional mode)."""
    return dict(SAMPLING, cfg=1.0) if cond_dropout <= 0 else dict(SAMPLING)


# what each sampling setting accepts (generate.py, app.py and deploy.py's sampling_grid check with them)
SAMPLING_RANGES = dict(top_k="[0, 1024]", top_p="(0, 1]", temperature="[0.01, 100]", cfg="[1, 100]")


def sampling_value(name, text):
    """One sampling setting's value from its text, checked: ValueError with the reason."""
    if name not in SAMPLING_RANGES:
        raise ValueError(f"{name!r} is not a sampling setting: use {', '.join(SAMPLING_RANGES)}")
    try:
        value = float(text)
        value = int(value) if name == "top_k" and value.is_integer() else value
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number") from None
    interval = SAMPLING_RANGES[name]
    low, high = (float(x) for x in interval[1:-1].split(","))
    if not low <= value <= high or (interval[0] == "(" and value == low) or (name == "top_k" and not isinstance(value, int)):
        raise ValueError(f"{name}={text} is out of range: it must be " + ("a whole number " if name == "top_k" else "")
                         + f"in {interval}" + (" (0: off)" if name == "top_k" else ""))
    return value


def parse_grid(text, base):
    """Sampling settings written as deploy.py's sampling_grid ("cfg=1|top_k=250,cfg=3": settings separated by
    |, each name=value pairs joined by commas) → [settings], each on top of `base`. ValueError with the
    reason for a name or value it does not take."""
    grid = []
    for entry in filter(None, (e.strip() for e in text.split("|"))):
        setting = dict(base)
        for pair in entry.split(","):
            name, _, value = (x.strip() for x in pair.partition("="))
            try:
                setting[name] = sampling_value(name, value)
            except ValueError as e:
                raise ValueError(f"{e} (in {entry!r})") from None
        if setting not in grid:
            grid.append(setting)
    return grid


def describe(sampling):
    """Sampling settings in generate.py's names, for a line or a table."""
    return " ".join(f"{k}={v:g}" + (" (off)" if (k == "top_k" and v == 0) or (k in ("top_p", "cfg") and v == 1) else "")
                    for k, v in sampling.items())


def sample_next(logits, noise, top_k=0, top_p=1.0, temperature=1.0, cfg=1.0):
    """logits (B, n_q, V), or (2B, n_q, V) with guidance (cfg != 1: the conditional rows, then the
    unconditional ones) → sampled ids (B, n_q): the guidance mix, then temperature, top-k (0: off), top-p.
    noise (B, n_q, V): Exp(1) draws. argmax(probs / noise) is a draw from probs (the exponential race:
    what torch.multinomial does for one sample, with the same draws, less its checks of probs, which
    cost a dozen kernels), so sampling is tensor operations only and can be captured in a CUDA graph."""
    logits = logits.float()
    if cfg != 1.0:
        cond, uncond = logits.chunk(2)
        logits = torch.lerp(uncond, cond, cfg)             # uncond + cfg · (cond - uncond), one operation
    if temperature != 1.0:
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
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
        if mode != "eager" and not getattr(model, "decoding_copy", False):   # its fast forms are what compiles right
            raise ValueError(f"decode mode {mode} runs a model's decoding copy: decoding.for_decoding(model, device, dtype)")
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
def generate(model, text_encoder, prompts, codes, seed=0, top_k=0, top_p=1.0, temperature=1.0, cfg=1.0,
             stride=None, mode="eager", refeed=False, decoders=None):
    """Sample the UNKNOWN entries of codes (B, n_q, T) in place, left to right, one prompt per row; given
    entries (a continuation) are kept. A generator: it yields (start, end) each time code steps
    [start, end) are complete in every codebook, so a caller can decode and play them at once.

    Any length: a model whose positions are relative, with FAVOR+ attention, carries its state on (the
    same cost and memory per step at any length); any other model goes by windows of max_len steps,
    each new window re-prefilled with the last max_len - stride steps of the previous one (MusicGen's
    extend_stride). Each step after a prefill is one Decoder.advance, the model's step and the sampler
    together, so that a CUDA graph replays both: per step the host only draws the noise and copies a
    column, and never waits for the device. refeed=True runs the whole window through forward() at
    every step instead of the recurrent state: the slow reference method, which samples the same codes.
    decoders: a dict that keeps the Decoder of each batch size, mode and sampling settings for later calls
    (a CUDA graph or a compiled step made once)."""
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
    key = (text.shape[0], mode, *sampling.items())
    if decoders is not None and key in decoders:      # captured for an earlier request: prefill resets its state
        decoder = decoders[key]
    else:
        decoder = None if refeed else Decoder(model, text.shape[0], device, mode, **sampling)
        if decoders is not None and decoder is not None:
            decoders[key] = decoder
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
