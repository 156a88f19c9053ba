"""
Measure everything in one run and write the tables to BENCHMARKS.md (appending a section for this machine).

    python bench.py                      # everything, on cuda if available
    python bench.py --parts=decode,long  # only some tables

Training figures are one optimizer step (forward + backward + AdamW) at batch 1, each configuration in a
fresh process so that peak memory is its own. performer-pytorch's Performer is built in the reference
configuration; a run that would exceed cap_seconds is stopped and reported as such.
"""
import json
import os
import platform
import signal
import subprocess
import sys
import time

import settings  # first: Ctrl-C while the libraries below load then ends in one line, not a traceback
import torch

import checkpoint
import codec
import common
import decoding


# -----------------------------------------------------------------------------
# settings: edit here, or override on the command line as --name=value
device = "auto"             # auto (cuda when available), cpu, cuda
parts = "train,memory,decode,long,long_ce,generate,encode"   # which measurements to run
seq_lens = "1500,4500,9000" # training lengths to measure
cap_seconds = 300           # stop a single measurement that runs longer than this
decode_steps = 1500         # generation length (1500 = 10 s of audio)
rounds = 7                  # interleaved rounds of the decode-step measurement
modes = ""                  # decode modes to compare (empty: eager and compile on a CPU, eager, graph and compile on a GPU)
generate_modes = "auto"     # decode modes of generate.py's end-to-end table, e.g. auto,compile
long_steps = 200            # steps measured at each position of a long piece
long_ce_steps = 600         # training steps of each small model in the beyond-the-training-length measurement
encode_clips = 8            # clips in the encode comparison
encode_seconds = 10         # ... of this many seconds (whole codec segments) each
compress_clips = 240        # synthetic clips for compress.py end to end
memory_seq_len = 4500       # seq_len of the memory-versus-depth table
depths = "3,6,12"           # depths of the memory table
learning_data = ""          # the learning benchmark (--parts=learning, not run by default): shards of real music (../shared/devcorpus)
learning_steps = 1000       # optimizer steps each configuration trains for
learning_model = "dim=256,depth=2,heads=4,dim_head=64,nb_features=64,seq_len=750,max_len=1500,batch_size=8,grad_accum=1,warmup_steps=100,lr=1e-3"
learning_configs = "positions=relative|positions=absolute|positions=absolute,random_offsets=true"   # what each run changes, | between runs
output = "docs/benchmark-log.md"   # every run is appended here, dated (the history)
current = "BENCHMARKS.md"   # the current figures: the block of each part measured on this kind of machine is rewritten
part = ""                   # internal: run one measurement and print it as JSON
impl = "favor"              # internal: favor | softmax | performer
seq_len = 4500              # internal
precision = "bfloat16"      # internal: autocast dtype of a training step on CUDA (float32: none)
depth = 6                   # internal
reversible = True           # internal
compiled = False            # internal: the training step with deploy.py's --compile (train.compile_for_training)
learning_config = ""        # internal: one configuration of the learning benchmark
# -----------------------------------------------------------------------------


def sync(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_gib(dev):
    if dev.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_memory_gib(dev):
    if dev.startswith("cuda"):
        return torch.cuda.memory_allocated() / 2**30
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def matmul_rate(dev):
    """Measured dense matmul rate in FLOP/s (fp32 on CPU, bf16 on CUDA)."""
    n = 8192 if dev.startswith("cuda") else 2048
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    a @ b
    sync(dev)
    reps, t = 0, time.time()
    while time.time() - t < 2.0:
        a @ b
        reps += 1
    sync(dev)
    return 2 * n**3 * reps / (time.time() - t)


def our_model(cfg_overrides, dev):
    import model as M
    return M.MusicTransformer(M.ModelConfig(**cfg_overrides)).to(dev)


class ReferenceStack(torch.nn.Module):
    """The reference system's network: performer-pytorch's Performer (causal, reversible, cross-attending,
    generalized kernel, 128 features, 1 local head of 150, ReZero, token shift, ff mult 2 in 2 chunks,
    dropout 0.1) with 4 summed codebook embeddings, sinusoidal + rotary positions and 4 output heads."""

    def __init__(self, max_len):
        super().__init__()
        import contextlib
        import io
        from performer_pytorch import Performer
        from performer_pytorch.performer_pytorch import FixedPositionalEmbedding
        with contextlib.redirect_stdout(io.StringIO()):   # it prints that the CUDA kernel is missing
            self.net = Performer(dim=512, depth=6, heads=8, dim_head=64, local_attn_heads=1, local_window_size=150,
                                 causal=True, ff_mult=2, nb_features=128, reversible=True, ff_chunks=2,
                                 generalized_attention=True, use_rezero=True, ff_dropout=0.1, attn_dropout=0.1,
                                 cross_attend=True, shift_tokens=True)
        self.embed = torch.nn.ModuleList([torch.nn.Embedding(1025, 512) for _ in range(4)])
        self.pos, self.rot = FixedPositionalEmbedding(512, max_len), FixedPositionalEmbedding(64, max_len)
        self.text_proj = torch.nn.Linear(768, 512)
        self.norm, self.heads = torch.nn.LayerNorm(512), torch.nn.Linear(512, 4 * 1024)

    def forward(self, tokens, text, mask):
        x = sum(e(tokens[:, k]) for k, e in enumerate(self.embed))
        x = x + self.pos(x)
        x = self.net(x, pos_emb=self.rot(x), context=self.text_proj(text), context_mask=mask)
        b, t, _ = x.shape
        return self.heads(self.norm(x)).view(b, t, 4, 1024).permute(0, 2, 1, 3)


def flops_per_step(n_params, t, impl, layers=6, heads=8, d=64, features=128, chunk=128):
    """Useful FLOPs of one forward+backward at batch 1: 6·N·T for the weights, plus attention
    (FAVOR+: features, intra-chunk products, running state; exact: the causal half of QKᵀ and AV)."""
    if impl == "softmax":
        attention = 2 * 2 * t * t / 2 * d * (heads - 1)
    else:
        attention = (heads - 1) * (2 * 2 * t * d * features + 2 * t * chunk * (features + d) + 4 * t * features * (d + 1))
    local = 2 * 2 * t * 150 * d
    return 6 * n_params * t + 3 * layers * (attention + local)


def train_step_part(c, dev):
    """One measured optimizer step (after one warm-up step) → seconds, peak memory, FLOPs."""
    import model as M
    t = c["seq_len"]
    torch.manual_seed(0)
    if c["impl"] == "performer":
        net = ReferenceStack(t).to(dev)
        text = torch.randn(1, 16, 768, device=dev)
    else:
        net = our_model(dict(attention=c["impl"], depth=c["depth"], reversible=c["reversible"], max_len=t), dev)
        text = torch.randn(1, 16, 384, device=dev)
    mask = torch.ones(1, 16, dtype=torch.bool, device=dev)
    import scoring
    import train
    run = train.compile_for_training(net) if c["compiled"] else net
    n_params = sum(p.numel() for p in net.parameters())
    codes = torch.randint(0, 1024, (1, 4, t), device=dev)
    tokens = M.inputs_from_targets(codes, 1024)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=dev.startswith("cuda"))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=c["precision"] == "bfloat16") if dev.startswith("cuda") \
        else torch.autocast("cpu", enabled=False)
    times = []
    for i in range(2 if dev == "cpu" else 4):
        if i and times[0] > 20 and not c["compiled"]:   # a slow configuration: its first step is the measurement
            break
        if i == 1 and dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        sync(dev)
        before = current_memory_gib(dev)
        start = time.time()
        with autocast:
            loss, _ = M.codebook_loss(run(tokens, text, mask), codes)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(dev)
        times.append(time.time() - start)
    seconds = min(times[1:] or times)
    peak = peak_memory_gib(dev)
    # what the step itself needed beyond the weights and optimizer state already resident
    activations = peak - before - 4 * n_params / 2**30
    return dict(seconds=seconds, peak_gib=peak, activation_gib=activations, params=n_params,
                flops=flops_per_step(n_params, t, c["impl"], layers=c["depth"]))


def run_part(args, cap):
    """Run one measurement in a fresh process; None if it failed or ran past the cap."""
    cmd = [sys.executable, os.path.abspath(__file__), *[f"--{k}={v}" for k, v in args.items()]]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=cap)
    except subprocess.TimeoutExpired:
        return dict(capped=True)
    if out.returncode in (130, -signal.SIGINT, -signal.SIGTERM):
        raise KeyboardInterrupt          # the measurement was stopped: so is the benchmark, nothing after it starts
    if out.returncode != 0:
        return dict(error=(out.stderr.strip().splitlines() or ["?"])[-1][:200])
    return json.loads(out.stdout.strip().splitlines()[-1])


def weight_read_rate(dev):
    """Bytes per second a large fp32 matrix-vector product reads: the memory limit of a decode step."""
    w = torch.randn(8192, 8192, device=dev)
    x = torch.randn(8192, device=dev)
    times = []
    for _ in range(12):
        sync(dev)
        t = time.perf_counter()
        for _ in range(4):
            w @ x
        sync(dev)
        times.append((time.perf_counter() - t) / 4)
    return w.numel() * 4 / sorted(times)[len(times) // 2]


def step_weight_bytes(net):
    """fp32 bytes of the weights one decode step reads: every linear layer but the text's projections."""
    import model as M
    skip = {net.text_proj} | {b.f.layer.to_kv for b in net.blocks if isinstance(b.f.layer, M.CrossAttention)}
    return sum(m.weight.numel() * 4 for m in net.modules() if isinstance(m, torch.nn.Linear) and m not in skip)


def count_ops(fn, only=None):
    """Operations fn() runs, views apart (a view launches no kernel), and the elements they allocate: the
    cost of a decode step that does not depend on the machine. On a GPU each operation is a kernel, and a
    CUDA graph's replay of a step costs about its kernel count times a few microseconds. only: a set of
    operators, to count only those."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = elements = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in only if only is not None else not func.is_view:
                Count.ops += 1
                Count.elements += sum(t.numel() for t in (out if isinstance(out, (tuple, list)) else [out]) if torch.is_tensor(t))
            return out
    with Count():
        fn()
    return Count.ops, Count.elements


def random_text(texts, device):
    return torch.randn(len(texts), 16, 384, device=device), torch.ones(len(texts), 16, dtype=torch.bool, device=device)


def decoding_copy(net, dtype, dev):
    import copy
    return decoding.for_decoding(copy.deepcopy(net), dev, dtype)


def decode_part(c, dev):
    """ms per decode step of the default model (see step_times); bf16's effect on the logits; recurrent
    decoding against re-feeding the sequence; the encodec's share of real time."""
    import model as M
    torch.manual_seed(0)
    base = our_model(dict(dropout=0.0), "cpu").eval()
    out = step_times(base, c, dev)
    fp32, bf16 = decoding_copy(base, torch.float32, dev), decoding_copy(base, torch.bfloat16, dev)
    tokens = torch.randint(0, 1024, (1, 4, min(300, c["decode_steps"])), device=dev)
    text = random_text(["x"], dev)
    with torch.no_grad():
        a, b_ = fp32(tokens, *text).float(), bf16(tokens, text[0].bfloat16(), text[1]).float()
    kl = torch.nn.functional.kl_div(b_.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    out["bf16"] = dict(max_abs=float((a - b_).abs().max()), mean_kl=float(kl.mean()), top1=float((a.argmax(-1) == b_.argmax(-1)).float().mean()))
    out["refeed_steps"] = short = min(150, c["decode_steps"])
    for name, refeed in (("recurrent_150_s", False), ("refeed_150_s", True)):
        sync(dev)
        t = time.time()
        decoding.sample(fp32, random_text, ["x"], short, dev, cfg=1.0, refeed=refeed)
        sync(dev)
        out[name] = time.time() - t
    costs, lengths = [], [1, c["decode_steps"] // 2, c["decode_steps"]]
    with torch.no_grad():
        for n in lengths:
            tokens = torch.randint(0, 1024, (1, 4, n), device=dev)
            fp32(tokens, *text)
            sync(dev)
            t = time.time()
            fp32(tokens, *text)
            sync(dev)
            costs.append(time.time() - t)
    out["refeed_total_s"] = sum((lengths[i + 1] - lengths[i]) * (costs[i] + costs[i + 1]) / 2 for i in range(len(lengths) - 1))
    encodec = codec.load_codec("untrained", "", 0, 6.0, dev)      # the encodec's share: decoding one 1 s segment
    stream, codes = codec.SegmentStream(encodec, 0.1), torch.randint(0, 1024, (1, 4, 150), device=dev)
    with torch.no_grad():
        stream.push(codes)
        sync(dev)
        t = time.perf_counter()
        for _ in range(5):
            stream.push(codes)
        sync(dev)
    out["codec_ms_per_second"] = 1e3 * (time.perf_counter() - t) / 5
    return out


def step_times(base, c, dev):
    """ms per step for eager / compiled (CPU) or CUDA graph, fp32 / bf16 weights, batch 1 / 2 (guidance),
    and at batch 2 the step with the sampler after it (Decoder.advance: what generate.py runs per step),
    measured in interleaved rounds with the weight-read limit measured between them."""
    import model as M
    wbytes = step_weight_bytes(base)
    modes = c["modes"].split(",") if c["modes"] else ["eager", "graph", "compile"] if dev.startswith("cuda") else ["eager", "compile"]
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        net = decoding_copy(base, dtype, dev)
        for mode in modes:
            for b in (1, 2):
                decoder = decoding.Decoder(net, b, dev, mode, top_k=250, cfg=3.0 if b == 2 else 1.0)
                tokens = torch.randint(0, 1024, (b, 4, 8), device=dev)
                decoder.prefill(tokens, *random_text(["x"] * b, dev))
                calls = {b: lambda d=decoder, x=tokens[..., 0]: d.step(x)}
                if b == 2:
                    column = torch.full((1, 4), M.UNKNOWN, device=dev)
                    noise = torch.empty(1, 4, 1024, device=dev).exponential_()
                    calls["2+sampler"] = lambda d=decoder, x=tokens[:1, :, 0]: d.advance(x, column, noise)
                for key, call in calls.items():
                    ops = count_ops(call)[0] if mode == "eager" else None
                    t = time.time()
                    call()                                            # compiles or captures
                    runs[(str(dtype)[6:], mode, key)] = dict(call=call, setup_s=time.time() - t, times=[], ops=ops)
    limits = []
    for _ in range(c["rounds"]):
        limits.append(wbytes / weight_read_rate(dev))
        for r in runs.values():
            for _ in range(3):
                r["call"]()
            sync(dev)
            t = time.perf_counter()
            for _ in range(20):
                r["call"]()
            sync(dev)
            r["times"].append((time.perf_counter() - t) / 20)
    median = lambda v: sorted(v)[len(v) // 2]
    steps = {"/".join(map(str, k)): dict(ms=1e3 * median(r["times"]), setup_s=r["setup_s"], ops=r["ops"]) for k, r in runs.items()}
    for (dtype, mode, key), r in runs.items():
        if key == 2:       # what guidance costs: batch 2 over batch 1 of the same round (the machine's pace drifts between rounds)
            one = runs[(dtype, mode, 1)]["times"]
            steps[f"{dtype}/{mode}/2"]["vs_batch1"] = median([t2 / t1 for t2, t1 in zip(r["times"], one)])
    return dict(limit_ms=1e3 * median(limits), weight_mb=wbytes / 1e6, steps=steps)


def long_part(c, dev):
    """ms per step and memory at 30 s, 3 min and 10 min into a piece (the position set directly: a step's
    work depends on it only through the rotary angles and the ring slot): the state carried on (relative
    positions) and windows (absolute positions: one re-prefill of max_len - stride steps per stride, its
    cost spread over the stride's steps)."""
    import model as M
    torch.manual_seed(0)
    mode = "graph" if dev.startswith("cuda") else "eager"
    out = {}
    for positions in ("relative", "absolute"):
        net = decoding_copy(our_model(dict(dropout=0.0, positions=positions), "cpu").eval(), torch.float32, dev)
        decoder = decoding.Decoder(net, 2, dev, mode)
        text = random_text(["x", ""], dev)
        tokens = torch.randint(0, 1024, (2, 4, 1800), device=dev)       # the context a window re-prefills (12 s)
        sync(dev)
        t = time.time()
        decoder.prefill(tokens, *text)
        sync(dev)
        prefill_s = time.time() - t
        for seconds in (30, 180, 600):
            if positions == "relative":
                decoder.state["pos"].fill_(seconds * codec.FRAME_RATE)
            else:
                decoder.prefill(tokens, *text)
            for _ in range(3):
                decoder.step(tokens[..., 0])
            if dev.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            sync(dev)
            t = time.perf_counter()
            for _ in range(c["long_steps"]):
                decoder.step(tokens[..., 0])
            sync(dev)
            ms = 1e3 * (time.perf_counter() - t) / c["long_steps"]
            if positions == "absolute":      # each stride of 2700 steps also pays one re-prefill
                ms += 1e3 * prefill_s / 2700
            out[f"{positions}/{seconds}"] = dict(ms=ms, mem_gib=peak_memory_gib(dev) if dev.startswith("cuda") else current_memory_gib(dev))
    return out


def long_ce_part(c, dev):
    """Cross-entropy on steps beyond the training length against steps within it, for small models trained
    here on synthetic music-like codes (each clip walks a 'key' of 8 codes per codebook, new clips at every
    step, so the key must be read from the context): relative positions carrying the state on, absolute
    positions carrying on (out of distribution) and by windows."""
    import model as M
    seq, long = 300, 1200

    def clip(seed, length):
        g = torch.Generator().manual_seed(seed)
        out = torch.empty(4, length, dtype=torch.long)
        for k in range(4):
            key = torch.randperm(64, generator=g)[:8]
            out[k] = key[torch.cumsum(torch.randint(1, 3, (length,), generator=g), 0) % 8]
        return out
    val = torch.stack([clip(10**9 + i, long) for i in range(16)]).to(dev)
    text = lambda b: (torch.zeros(b, 1, 24, device=dev), torch.ones(b, 1, dtype=torch.bool, device=dev))

    def train(positions):
        torch.manual_seed(0)
        cfg = M.ModelConfig(dim=96, depth=2, heads=4, dim_head=24, nb_features=32, local_window=16, text_dim=24, dropout=0.0,
                            max_len=seq, positions=positions, vocab=64)
        net = M.MusicTransformer(cfg).to(dev)
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3, betas=(0.9, 0.95))
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=c["long_ce_steps"], pct_start=0.1)
        for step in range(c["long_ce_steps"]):       # fresh clips every step: the key must be read from the context
            codes = torch.stack([clip(8 * step + j, seq) for j in range(8)]).to(dev)
            loss, _ = net.loss(M.inputs_from_targets(codes, 64), codes, *text(8))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            schedule.step()
        net.final_train_loss = loss.item()
        return net.eval()

    @torch.no_grad()
    def ce(net, windows=None):
        def score(codes):
            logits = net(M.inputs_from_targets(codes, 64), *text(codes.shape[0]))
            return torch.nn.functional.cross_entropy(logits.flatten(0, 2), codes.flatten(), reduction="none").view(codes.shape).mean((0, 1))
        if windows is None:
            return score(val)
        span, stride = windows
        out, start, done = torch.empty(long, device=dev), 0, 0
        while done < long:
            end = min(long, start + span)
            out[done:end] = score(val[..., start:end])[done - start:]
            done, start = end, end - (span - stride)
        return out
    out = {}
    for positions in ("relative", "absolute"):
        net = train(positions)
        runs = [("carry on", None)] + ([("windows", (seq, 180))] if positions == "absolute" else [])
        for how, windows in runs:
            v = ce(net, windows)
            out[f"{positions}/{how}"] = [net.final_train_loss, float(v[:seq].mean()), float(v[seq:2 * seq].mean()),
                                         float(v[2 * seq:].mean())]
    return out


def generate_part(c, dev):
    """generate.py's path end to end (tokens with its default sampling, streamed encodec decode, MP3 written as it is made),
    decode_steps per prompt at batch 1 and 4, and the time until the first second of audio is on disk; for
    each of generate_modes (decode=compile twice: its first piece in a process compiles, the second not)."""
    import model as M
    net = decoding_copy(our_model(dict(dropout=0.0), "cpu").eval(), torch.bfloat16, dev)    # generate.py's default at these batches
    encodec = codec.load_codec("untrained", "", 0, 6.0, dev)
    result = {}
    for requested in c["generate_modes"].split(","):
        mode = decoding.decode_mode(requested, dev, c["decode_steps"])
        for batch in (1, 4):
            for piece in (1, 2) if mode == "compile" else (1,):
                result[f"{requested}/{piece}/batch{batch}"] = dict(
                    timed_piece(net, encodec, batch, c["decode_steps"], mode, dev), mode=mode, dtype="bfloat16")
    return result


def timed_piece(net, encodec, batch, steps, mode, dev):
    """One generate.py piece of `steps` per prompt for `batch` prompts (generate.py's default sampling, with
    guidance; MP3s written as they are made, through generate.Pieces): seconds in all, and until the first
    second of audio was written."""
    import tempfile
    import generate
    info = dict(step=0, weights="ema", cond_dropout=0.1, data=dict(codec="untrained:seed=0", typical_scale=0.1))
    session = generate.Session(net, info, random_text, encodec, dev, next(net.parameters()).dtype)
    with tempfile.TemporaryDirectory() as tmp:
        c, _ = session.sampling(dict(settings.settings(vars(generate)), prompt=["x"], num_samples=batch,
                                     seconds=steps / codec.FRAME_RATE, decode=mode, out=tmp, window_stride=18.0))
        sync(dev)
        t, first = time.time(), None
        for _ in generate.Pieces(session, c):
            first = first or time.time() - t
        sync(dev)
        return dict(total_s=time.time() - t, first_audio_s=first)


def encode_part(c, dev):
    """Encodec 48 kHz encode: the package's loop and all segments batched, audio-seconds per second, side by
    side in interleaved rounds (encode_clips of encode_seconds); and compress.py end to end on synthetic clips."""
    import shutil
    import tempfile
    import compress
    import example
    import soundfile as sf
    encodec = codec.load_codec("untrained", "", 0, 6.0, dev)
    g = torch.Generator().manual_seed(0)
    clips = [torch.randn(2, codec.clip_samples(c["encode_seconds"]), generator=g).to(dev) * 0.1 for _ in range(c["encode_clips"])]
    seconds = sum(x.shape[-1] for x in clips) / codec.SAMPLE_RATE
    times = {"loop": [], "batched": []}
    with torch.inference_mode():
        for _ in range(max(1, c["rounds"] // 2)):
            for path in times:
                sync(dev)
                t = time.time()
                codec.encode_clips(encodec, clips, batched=path == "batched")
                sync(dev)
                times[path].append(time.time() - t)
        decode_t = time.time()
        codes = [code for code, _ in codec.encode_clips(encodec, clips[:2])]
        codec.decode_codes(encodec, torch.stack(codes), 0.1)
        sync(dev)
        decode_rate = len(codes) * c["encode_seconds"] / (time.time() - decode_t)
    out = {k: seconds / min(v) for k, v in times.items()}
    out["decode_x"] = decode_rate
    folder = tempfile.mkdtemp()
    try:
        for i in range(c["compress_clips"]):
            sf.write(os.path.join(folder, f"{i:04d}.wav"),
                     example.synth_clip(example.KINDS[i % 3], "major" if i % 2 else "minor", "fast", seconds=5.0, seed=i), 48_000)
        t = time.time()
        compress.main(["--input", folder, "--output", os.path.join(folder, "out"), "--codec=untrained", "--clip_seconds=5",
                       f"--device={dev}", "--num_workers=2", "--check_codec=0"])
        out["compress_s"] = time.time() - t
        out["compress_audio_s"] = c["compress_clips"] * 5.0
    finally:
        shutil.rmtree(folder)
    return out


def machine(dev):
    if dev.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def learning_part(c, dev):
    """One configuration of the learning benchmark: deploy.py trains a small model on real music for a fixed
    number of steps (its final evaluation scores the validation loss, the conditioning gap, and 32 samples
    of 10 s: FAD, KAD, adherence); then the cross-entropy of the validation clips within the training length
    and beyond it (steps seq_len..2·seq_len of the full clips, one forward from the clip's start)."""
    import tempfile
    import deploy
    import model as M
    import scoring
    import train
    overrides = [f"--{kv}" for kv in (c["learning_model"] + "," + c["learning_config"]).split(",") if kv]
    with tempfile.TemporaryDirectory() as out:
        t = time.time()
        deploy.main(["--data", c["learning_data"], "--out", out, f"--max_steps={c['learning_steps']}",       # a configuration
                     f"--eval_interval={c['learning_steps']}", "--log_interval=50", "--sample_interval=0", "--val_fraction=0.1",
                     "--eval_clips=64", "--quality_samples=32", "--quality_seconds=10", "--num_workers=1", f"--device={dev}",
                     *overrides])                                     # may change any of these (quality_samples=0: no samples)
        took = time.time() - t
        records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        model, info = checkpoint.load_model(out, device=dev)
        ckpt = checkpoint.load_checkpoint(os.path.join(out, "ckpt.pt"))
    c_run = ckpt["config"]
    data = deploy.Data(c["learning_data"], c_run["val_fraction"], c_run["seed"], resumed=ckpt)
    seq = c_run["seq_len"]
    text_encoder = checkpoint.TextEncoder(info["text_encoder"], dev)
    total = torch.zeros(2 * seq)
    count = torch.zeros(2 * seq)
    with torch.no_grad():
        for i in data.val_ids[:64]:
            codes = torch.from_numpy(data.read(int(i), 0, 2 * seq))[None]
            tokens, targets, text, mask = scoring.batch_tensors(codes, [data.texts[int(i)]], text_encoder, model.cfg.pattern,
                                                              model.cfg.vocab, dev)
            logits = model(tokens, text, mask)
            valid = targets >= 0
            ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 2), targets.clamp_min(0).flatten(),
                                                   reduction="none").view(targets.shape) * valid
            total += ce.sum((0, 1))[:2 * seq].cpu()
            count += valid.sum((0, 1))[:2 * seq].cpu()
    last = {}
    for r in records:
        last.update({k: v for k, v in r.items() if v is not None})
    return dict(last, within=float(total[:seq].sum() / count[:seq].sum()), beyond=float(total[seq:].sum() / count[seq:].sum()),
                train_s=took, params=model.num_params())


def learning_section(c, sub, rate):
    if not c["learning_data"]:
        raise settings.UserError("--parts=learning needs --learning_data=SHARDS: build the development corpus "
                               "(../shared/devcorpus/README.md) and compress it with --clip_seconds=10")
    found = {config: sub(dict(part="learning", learning_config=config), 100 * c["cap_seconds"]) for config in c["learning_configs"].split("|")}
    base = next((r for r in found.values() if "val_loss" in r), {})
    rows = [["configuration", "validation loss (within / beyond the training length)", "conditioning gap (labels exchanged / "
             "empty text)", "adherence at cfg 1", "the run's sampling: KAD (× 1000), adherence", "FAD", "last training loss",
             "training time"]]
    for config, r in found.items():
        if "val_loss" not in r:
            rows.append([config or "(defaults)", f"failed: {r.get('error', 'capped')}"] + [""] * 6)
            continue
        unguided = next((x for x in r.get("sampling_scores", []) if x["sampling"]["cfg"] == 1), {})
        chosen = decoding.describe(r["sampling"]).replace(" (off)", "") if r.get("sampling") else "?"
        rows.append([config or "(defaults)", f"{r['val_loss']:.3f} ({r['within']:.3f} / {r['beyond']:.3f})",
                     f"{r.get('conditioning_gap', float('nan')):+.3f} / {r['val_loss_empty'] - r['val_loss']:+.3f}",
                     "–" if unguided.get("adherence") is None else f"{unguided['adherence']:.2f}",
                     "–" if "kad" not in r else f"{chosen}: {r['kad']:.1f}, " + ("–" if r.get("adherence") is None else f"{r['adherence']:.2f}"),
                     "–" if "fad" not in r else f"{r['fad']:.2f}", f"{r['loss']:.3f}", f"{r['train_s'] / 60:.1f} min"])
        print(rows[-1], flush=True)
    refs = (f"Baselines on the same validation clips: unigram {base.get('baseline_unigram', float('nan')):.3f}, bigram "
            f"{base.get('baseline_bigram', float('nan')):.3f} nats. Samples against the validation clips, references: real training clips FAD {base.get('fad_real', float('nan')):.2f}, "
            f"KAD {base.get('kad_real', float('nan')):.2f}; unigram noise FAD {base.get('fad_noise', float('nan')):.2f}, KAD "
            f"{base.get('kad_noise', float('nan')):.2f}; label adherence of real validation clips "
            f"{base.get('adherence_real') or float('nan'):.2f}, chance {base.get('adherence_chance') or float('nan'):.2f}.")
    return ([f"### Learning real music: {c['learning_steps']} steps of a {base.get('params', 0) / 1e6:.1f} M-parameter model "
             f"({c['learning_model']}) on {c['learning_data']}\n"] + table(rows) + ["", refs,
            "Validation loss: the run's final evaluation (its first 64 validation clips from their start, seq_len steps); within / "
            "beyond: the same clips scored in one pass over twice the training length, steps 0 to seq_len−1 and seq_len to "
            "2·seq_len−1. Conditioning gap: the validation loss with each clip's label exchanged for another's, and with the "
            "empty text, minus with its own. Samples: 32 of 10 s for the validation clips' labels at each setting of the run's "
            "sampling_grid; adherence at cfg 1 is without guidance; the run's sampling is the setting its last evaluation chose "
            "(lowest KAD among those within reach of the best adherence). Each configuration in a fresh process, one after the "
            "other.\n"])


def table(rows):
    return ["| " + " | ".join(map(str, r)) + " |" for r in [rows[0], ["---"] * len(rows[0])] + rows[1:]]


# -----------------------------------------------------------------------------
# the sections of BENCHMARKS.md: each runs its measurements (in fresh processes) and returns its lines

def measured(c, sub, part, key, cap_factor):
    """One part's figures from a fresh process, or None if it failed (its error is printed)."""
    r = sub(dict(part=part), c["cap_seconds"] * cap_factor)
    print(part, r, flush=True)
    return r if key in r else None


def train_section(c, sub, rate):
    """On CUDA, ours trains under bf16 autocast; the reference's reversible backward fails under autocast
    (its recomputation runs outside it), so it runs in fp32, and the ratio is taken against ours in fp32."""
    cuda = c["device"].startswith("cuda")
    lines = ["### Training step (forward + backward + AdamW), batch 1" + (", bf16 autocast (the reference: fp32)" if cuda else "") + "\n"]
    names = ("favor", "compiled", "softmax", "performer") if cuda else ("favor", "softmax", "performer")  # compiling: minutes on a CPU
    rows = [["seq_len", "ours (FAVOR+)", *(["ours, --compile"] if cuda else []), "ours, attention=softmax",
             "performer-pytorch reference", "ours vs reference"]]
    for t in map(int, c["seq_lens"].split(",")):
        found = {name: sub(dict(part="train", impl="favor" if name == "compiled" else name, compiled=name == "compiled", seq_len=t,
                                precision="float32" if name == "performer" else "bfloat16")) for name in names}
        cells = [f"{r['seconds']:.2f} s, {r['peak_gib']:.2f} GiB, MFU {r['flops'] / r['seconds'] / rate:.0%}" if "seconds" in r
                 else f"stopped: over {c['cap_seconds']} s" if r.get("capped") else f"failed: {r['error']}" for r in found.values()]
        ours = sub(dict(part="train", impl="favor", seq_len=t, precision="float32")) if cuda else found["favor"]
        theirs = found["performer"]
        ratio = (f"{theirs['seconds'] / ours['seconds']:.1f}× faster" if "seconds" in theirs and "seconds" in ours
                 else f"> {c['cap_seconds'] / ours['seconds']:.0f}× faster" if theirs.get("capped") and "seconds" in ours else "–")
        if cuda and "seconds" in ours:
            ratio += f" (both fp32; ours {ours['seconds']:.2f} s)"
        rows.append([t, *cells, ratio])
        print(t, cells, ratio, flush=True)
    return lines + table(rows) + ["\nEach cell: seconds per step, peak memory (GPU: allocated; CPU: process peak RSS), MFU.\n"]


def memory_section(c, sub, rate):
    rows = [["depth", "parameters", "reversible", "not reversible"]]
    for d in map(int, c["depths"].split(",")):
        found = [sub(dict(part="train", impl="favor", seq_len=c["memory_seq_len"], depth=d, reversible=rev)) for rev in (True, False)]
        cells = [f"{r['activation_gib']:.2f} GiB (peak {r['peak_gib']:.2f} GiB, {r['seconds']:.1f} s)" if "seconds" in r else "–"
                 for r in found]
        rows.append([d, next((f"{r['params'] / 1e6:.1f} M" for r in found if "params" in r), "–"), *cells])
        print("depth", d, cells, flush=True)
    return ([f"### Memory at seq_len {c['memory_seq_len']} (ours, FAVOR+): activation memory of a training step\n"] + table(rows)
            + ["\nActivation memory = peak during the step − memory resident before it − the gradients.\n"])


def decode_section(c, sub, rate):
    r = measured(c, sub, "decode", "steps", 4)
    if r is None:
        return []
    limit = r["limit_ms"]
    rows = [["weights", "decode", "batch 1 (no guidance)", "batch 2 (guidance)", "guidance costs",
             "batch 2 with the sampler (generate.py's step)", "setup (compile / capture)",
             "operations per step (eager; views apart): batch 1 / 2 / 2 with the sampler"]]
    for key in sorted({k.rsplit("/", 1)[0] for k in r["steps"]}):
        one, two, full = (r["steps"].get(f"{key}/{b}") for b in (1, 2, "2+sampler"))
        rows.append([*key.split("/"), f"{one['ms']:.2f} ms = {one['ms'] / limit:.2f}× limit",
                     f"{two['ms']:.2f} ms = {two['ms'] / limit:.2f}× limit", f"{two['vs_batch1']:.2f}× batch 1",
                     f"{full['ms']:.2f} ms = {full['ms'] / two['ms']:.2f}× the step" if full else "",
                     f"{one['setup_s']:.0f} s", " / ".join(str(x["ops"]) for x in (one, two, full) if x) if one.get("ops") else ""])
    best = min(v["ms"] for k, v in r["steps"].items() if k.endswith("/1"))
    per_second = best * codec.FRAME_RATE + r["codec_ms_per_second"]
    return ([f"### A decode step of the default model ({r['weight_mb']:.0f} MB of fp32 weights read per step)\n",
             f"Limit: those bytes / the weight-read rate, measured between the rounds: **{limit:.2f} ms**. "
             f"Each figure is the median of {c['rounds']} interleaved rounds of 20 steps; what guidance costs, the median "
             f"of each round's batch 2 / batch 1.\n"] + table(rows) +
            ["", f"bf16 weights against fp32 on {min(300, c['decode_steps'])} teacher-forced steps: largest logit difference "
             f"{r['bf16']['max_abs']:.3f}, mean KL(fp32 ‖ bf16) {r['bf16']['mean_kl']:.2e} nats, same most likely code "
             f"{r['bf16']['top1']:.1%} of the time.", "",
             f"Real time at batch 1 with the fastest step ({best:.2f} ms): 150 steps + the codec's {r['codec_ms_per_second']:.0f} ms "
             f"per second of audio = {per_second:.0f} ms per second: **{1000 / per_second:.2f}× real time**.", "",
             f"Recurrent decoding against re-feeding the sequence (fp32, eager): first {r['refeed_steps']} steps "
             f"{r['recurrent_150_s']:.1f} s against {r['refeed_150_s']:.1f} s ({r['refeed_150_s'] / r['recurrent_150_s']:.0f}× "
             f"faster); re-feeding all {c['decode_steps']} steps would take {r['refeed_total_s']:.0f} s (Σ of measured forwards).\n"])


def long_section(c, sub, rate):
    r = measured(c, sub, "long", "relative/30", 4)
    if r is None:
        return []
    rows = [["", "30 s", "3 min", "10 min"]]
    for positions, how in (("relative", "state carried on (positions=relative)"),
                           ("absolute", "windows of 30 s every 18 s (positions=absolute; re-prefill included)")):
        rows.append([how] + [f"{r[f'{positions}/{s}']['ms']:.2f} ms, {r[f'{positions}/{s}']['mem_gib']:.2f} GiB" for s in (30, 180, 600)])
    return (["### Long pieces: cost per step at 30 s, 3 min and 10 min (default model, guidance; decode=graph on a GPU, eager on a CPU)\n"] + table(rows)
            + ["", "Memory: GPU allocated, or the CPU process's resident memory.\n"])


def long_ce_section(c, sub, rate):
    r = measured(c, sub, "long_ce", "relative/carry on", 12)
    if r is None:
        return []
    rows = [["positions", "past 300 steps", "last training loss", "steps 0-299 (trained length)", "300-599", "600-1199"]]
    rows += [[*key.split("/"), *[f"{x:.3f}" for x in v]] for key, v in r.items()]
    return ([f"### Beyond the training length: cross-entropy (nats) of small models trained on 300-step crops "
             f"({c['long_ce_steps']} steps), scored on 1200-step clips\n"] + table(rows)
            + ["", "Uniform over a clip's 8-code key: 2.079 nats; knowing the key and the last code: 0.693.\n"])


def generate_section(c, sub, rate):
    r = measured(c, sub, "generate", f"{c['generate_modes'].split(',')[0]}/1/batch1", 4)
    if r is None:
        return []
    rows = [["decode", "prompts", "total", "real time", "first second of audio on disk after"]]
    for key, v in r.items():
        requested, piece, batch = key.split("/")
        how = v["mode"] + (" (auto)" if requested == "auto" else "") + (
            {"1": ", first piece: compiling included", "2": ", second piece"}[piece] if v["mode"] == "compile" else "")
        rows.append([how, batch.removeprefix("batch"), f"{v['total_s']:.1f} s",
                     f"{c['decode_steps'] / 150 / v['total_s']:.2f}×", f"{v['first_audio_s']:.1f} s"])
    return ([f"### generate.py's path end to end: {c['decode_steps'] / 150:g} s per prompt (generate.py's default sampling: "
             f"{decoding.describe(decoding.SAMPLING)}; bfloat16 weights, streamed codec decode, MP3 written as it is made)\n"] + table(rows) + [""])


def encode_section(c, sub, rate):
    r = measured(c, sub, "encode", "loop", 4)
    if r is None:
        return []
    rows = [["encode: the package's loop", "encode: all segments batched", "decode"],
            [f"{r['loop']:.1f} audio-s/s", f"{r['batched']:.1f} audio-s/s ({r['batched'] / r['loop']:.2f}×)", f"{r['decode_x']:.1f} audio-s/s"]]
    return ([f"### Encodec 48 kHz ({c['encode_clips']} clips × {c['encode_seconds']:g} s, best of {max(1, c['rounds'] // 2)} interleaved rounds)\n"]
            + table(rows) + ["", f"compress.py end to end, {c['compress_clips']} synthetic clips of 5 s (2 reader processes, "
                             f"encode=auto): {r['compress_s']:.0f} s = {r['compress_audio_s'] / r['compress_s']:.1f} audio-s/s.\n"])


SECTIONS = dict(train=train_section, memory=memory_section, decode=decode_section, long=long_section,
                long_ce=long_ce_section, generate=generate_section, encode=encode_section, learning=learning_section)
PARTS = dict(train=train_step_part, decode=decode_part, long=long_part, long_ce=long_ce_part, generate=generate_part,
             encode=encode_part, learning=learning_part)


def commit():
    """The commit measured (short), with a + where the working tree differs from it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(
            os.path.abspath(__file__))).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__))).returncode
    except OSError:
        return "?"
    return (sha or "?") + ("+" if sha and dirty else "")


def update_current(path, name, lines):
    """Rewrite the block `<!-- bench.py: NAME -->` ... `<!-- end -->` of the current figures (BENCHMARKS.md) with a
    section's new lines (its own headings left out). Returns whether the file has that block."""
    import re
    if not os.path.exists(path):
        return False
    text = open(path, encoding="utf-8").read()
    start = f"<!-- bench.py: {name} -->"
    if start not in text:
        return False
    body = "\n".join(line for line in lines if not line.startswith("#")).strip()
    text = re.sub(re.escape(start) + r".*?<!-- end -->", lambda _: f"{start}\n{body}\n<!-- end -->", text, count=1, flags=re.S)
    with common.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    return True


def main(argv):
    c = settings.parse_settings(globals(), argv)
    dev = common.pick_device(c["device"])
    if c["part"]:
        print(json.dumps(PARTS[c["part"]](c, dev)))
        return 0
    parts = c["parts"].split(",")
    if set(parts) - set(SECTIONS):
        raise settings.UserError(f"parts: unknown {', '.join(sorted(set(parts) - set(SECTIONS)))}; use {', '.join(SECTIONS)}")
    c["device"] = dev
    rate, read = matmul_rate(dev), weight_read_rate(dev)
    print(f"{machine(dev)}; matmul {rate / 1e9:.0f} GFLOP/s; weight reads {read / 1e9:.1f} GB/s", flush=True)
    lines = [f"\n## {machine(dev)}\n", f"Command: `{('python bench.py ' + ' '.join(argv)).strip()}`. Measured here: matmul "
             f"{rate / 1e9:,.0f} GFLOP/s ({'bf16' if dev.startswith('cuda') else 'fp32'}); a large fp32 matrix-vector product "
             f"reads weights at {read / 1e9:.1f} GB/s. MFU = useful FLOPs (6·params·T + attention) / time / that matmul rate.\n"]
    passed = ("decode_steps", "rounds", "modes", "generate_modes", "long_steps", "long_ce_steps", "encode_clips", "encode_seconds",
              "compress_clips", "learning_data", "learning_steps", "learning_model")
    sub = lambda args, limit=c["cap_seconds"]: run_part(dict(args, device=dev, **{k: c[k] for k in passed}), limit)
    settings.stop_on_sigterm()
    sections = {}
    try:
        for part in parts:
            sections[part] = SECTIONS[part](c, sub, rate)
            lines += sections[part]
    except KeyboardInterrupt:
        raise settings.stopped(f"nothing was written to {c['output']} (it is written once every part has run)") from None
    stamp = f"{time.strftime('%Y-%m-%d')}, commit {commit()}"
    lines[0] = f"\n## {machine(dev)} ({stamp})\n"
    os.makedirs(os.path.dirname(c["output"]) or ".", exist_ok=True)
    if not os.path.exists(c["output"]):
        with open(c["output"], "w") as f:
            f.write("# Benchmark log\n\nEvery `python bench.py` run, dated, appended. Figures from different machines are in "
                    "separate sections and are never compared with each other; BENCHMARKS.md holds the current ones.\n")
    with open(c["output"], "a") as f:
        f.write("\n".join(lines) + "\n")
    kind = "gpu" if dev.startswith("cuda") else "cpu"
    for part, block in sections.items():
        said = update_current(c["current"], f"{part} on {kind}", block + [f"Measured {stamp} on {machine(dev)}: "
                                                                         f"`{('python bench.py ' + ' '.join(argv)).strip()}`."])
        print(f"{c['current']}: {part} on {kind} " + ("rewritten" if said else "has no block for it (see the log)"))
    print(f"appended to {c['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
