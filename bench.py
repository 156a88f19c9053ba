"""
Measure everything in one run and write the tables to BENCHMARKS.md (appending a section for this machine).

    python bench.py                      # default model, seq_len 1500 / 4500 / 9000, on cuda if available
    python bench.py --device=cpu --cap_seconds=300

Training figures are one optimizer step (forward + backward + AdamW) at batch 1, each configuration in a
fresh process so that peak memory is its own. performer-pytorch's Performer is built in the reference
configuration; a run that would exceed cap_seconds is stopped and reported as such.
"""
import json
import os
import platform
import subprocess
import sys
import time

import torch

import common

# -----------------------------------------------------------------------------
device = "auto"             # auto (cuda when available), cpu, cuda
seq_lens = "1500,4500,9000" # training lengths to measure
cap_seconds = 300           # stop a single measurement that runs longer than this
decode_steps = 1500         # decoding and generation length (1500 = 10 s of audio)
memory_seq_len = 4500       # seq_len of the memory-versus-depth table
output = "BENCHMARKS.md"
part = ""                   # internal: run one measurement and print it as JSON
impl = "favor"              # internal: favor | softmax | performer
seq_len = 4500              # internal
depth = 6                   # internal
reversible = True           # internal
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
    n_params = sum(p.numel() for p in net.parameters())
    codes = torch.randint(0, 1024, (1, 4, t), device=dev)
    tokens = M.inputs_from_targets(codes, 1024)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=dev.startswith("cuda"))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.startswith("cuda") else torch.autocast("cpu", enabled=False)
    times = []
    for i in range(2 if dev == "cpu" else 4):
        if i and times[0] > 20:        # a slow configuration: its first step is the measurement
            break
        if i == 1 and dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        sync(dev)
        before = current_memory_gib(dev)
        start = time.time()
        with autocast:
            loss, _ = M.codebook_loss(net(tokens, text, mask), codes)
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
    if out.returncode != 0:
        return dict(error=(out.stderr.strip().splitlines() or ["?"])[-1][:200])
    return json.loads(out.stdout.strip().splitlines()[-1])


def decode_part(c, dev):
    """Recurrent decoding of `decode_steps` steps at batch 1 vs re-feeding the whole sequence each step
    (re-feeding measured for its first 150 steps, and its full cost integrated from single forwards)."""
    import generate
    net = our_model(dict(dropout=0.0), dev).eval()
    text_encoder = lambda texts, device: (torch.randn(len(texts), 16, 384, device=device),
                                          torch.ones(len(texts), 16, dtype=torch.bool, device=device))
    result = {}
    sync(dev)
    t = time.time()
    generate.sample_codes(net, text_encoder, ["x"], c["decode_steps"], dev, cfg=1.0, progress=False)
    sync(dev)
    result["recurrent_s"] = time.time() - t
    short = 150
    t = time.time()
    generate.sample_codes(net, text_encoder, ["x"], short, dev, cfg=1.0, progress=False)
    sync(dev)
    result["recurrent_150_s"] = time.time() - t
    t = time.time()
    generate.sample_codes(net, text_encoder, ["x"], short, dev, cfg=1.0, refeed=True, progress=False)
    sync(dev)
    result["refeed_150_s"] = time.time() - t
    # a full re-fed run costs Σ_t forward(t): integrate measured forwards at a few lengths
    lengths = [1, c["decode_steps"] // 4, c["decode_steps"] // 2, 3 * c["decode_steps"] // 4, c["decode_steps"]]
    costs = []
    text, mask = text_encoder(["x"], dev)
    with torch.no_grad():
        for n in lengths:
            tokens = torch.randint(0, 1024, (1, 4, n), device=dev)
            net(tokens, text, mask)
            sync(dev)
            t = time.time()
            net(tokens, text, mask)
            sync(dev)
            costs.append(time.time() - t)
    result["refeed_estimate_s"] = sum((lengths[i + 1] - lengths[i]) * (costs[i] + costs[i + 1]) / 2 for i in range(len(lengths) - 1))
    return result


def generate_part(c, dev):
    """decode_steps per prompt, end to end (tokens with cfg 3 + codec decode + MP3) at batch 1 and 4."""
    import tempfile
    import generate
    net = our_model(dict(dropout=0.0), dev).eval()
    text_encoder = lambda texts, device: (torch.randn(len(texts), 16, 384, device=device),
                                          torch.ones(len(texts), 16, dtype=torch.bool, device=device))
    codec = common.load_codec("untrained", "", 0, 6.0, dev)   # the same architecture as the pretrained codec
    result = {}
    for batch in (1, 4):
        sync(dev)
        t = time.time()
        codes = generate.sample_codes(net, text_encoder, ["x"] * batch, c["decode_steps"], dev, cfg=3.0, progress=False)
        sync(dev)
        t_tokens = time.time() - t
        audio = generate.codes_to_audio(codec, codes, 0.1)
        with tempfile.TemporaryDirectory() as tmp:
            for i, wav in enumerate(audio):
                common.write_audio(os.path.join(tmp, f"{i}.mp3"), wav)
        result[f"batch{batch}"] = dict(tokens_s=t_tokens, total_s=time.time() - t)
    return result


def codec_part(c, dev):
    codec = common.load_codec("untrained", "", 0, 6.0, dev)
    wav = torch.randn(4, 2, common.clip_samples(10), device=dev) * 0.1
    with torch.no_grad():
        common.encode_clips(codec, wav[:1])
        sync(dev)
        t = time.time()
        codes, scales = common.encode_clips(codec, wav)
        sync(dev)
        enc = time.time() - t
        t = time.time()
        common.decode_codes(codec, codes, scales)
        sync(dev)
        dec = time.time() - t
    seconds = 4 * wav.shape[-1] / common.SAMPLE_RATE
    return dict(encode_x_realtime=seconds / enc, decode_x_realtime=seconds / dec)


def machine(dev):
    if dev.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, float32"


def main(argv):
    c = common.parse_settings(common.settings(globals()), argv)
    dev = common.pick_device(c["device"])
    if c["part"]:
        fn = {"train": train_step_part, "decode": decode_part, "generate": generate_part, "codec": codec_part}[c["part"]]
        print(json.dumps(fn(c, dev)))
        return 0
    command = "python bench.py " + " ".join(argv)
    rate = matmul_rate(dev)
    cap = c["cap_seconds"]
    print(f"{machine(dev)}; matmul {rate / 1e9:.0f} GFLOP/s", flush=True)
    lines = [f"\n## {machine(dev)}\n", f"Command: `{command.strip()}`. Measured matmul rate: {rate / 1e9:,.0f} GFLOP/s "
             f"({'bf16' if dev.startswith('cuda') else 'fp32'}). MFU = useful FLOPs (6·params·T + attention) / time / that rate.\n"]

    lines += ["### Training step (forward + backward + AdamW), batch 1\n",
              "| seq_len | ours (FAVOR+) | ours, attention=softmax | performer-pytorch reference | ours vs reference |",
              "|---|---|---|---|---|"]
    for t in map(int, c["seq_lens"].split(",")):
        cells, rows = [], {}
        for name in ("favor", "softmax", "performer"):
            r = run_part(dict(part="train", impl=name, seq_len=t, device=dev), cap)
            rows[name] = r
            if "seconds" in r:
                cells.append(f"{r['seconds']:.2f} s, {r['peak_gib']:.2f} GiB, MFU {r['flops'] / r['seconds'] / rate:.0%}")
            else:
                cells.append(f"stopped: over {cap} s" if r.get("capped") else f"failed: {r['error']}")
            print(t, name, cells[-1], flush=True)
        ratio = (f"{rows['performer']['seconds'] / rows['favor']['seconds']:.1f}× faster" if "seconds" in rows["performer"]
                 else f"> {cap / rows['favor']['seconds']:.0f}× faster" if rows["performer"].get("capped") and "seconds" in rows["favor"] else "–")
        lines.append(f"| {t} | " + " | ".join(cells) + f" | {ratio} |")
    lines.append("\nEach cell: seconds per step, peak memory (GPU: allocated; CPU: process peak RSS), MFU.\n")

    lines += [f"### Memory at seq_len {c['memory_seq_len']} (ours, FAVOR+): activation memory of a training step\n",
              "| depth | parameters | reversible | not reversible |", "|---|---|---|---|"]
    for d in (3, 6, 12):
        cells = []
        for rev in (True, False):
            r = run_part(dict(part="train", impl="favor", seq_len=c["memory_seq_len"], depth=d, reversible=rev, device=dev), cap)
            cells.append(f"{r['activation_gib']:.2f} GiB (peak {r['peak_gib']:.2f} GiB, {r['seconds']:.1f} s)" if "seconds" in r else "–")
            params = f"{r['params'] / 1e6:.1f} M" if "params" in r else "–"
        print("depth", d, cells, flush=True)
        lines.append(f"| {d} | {params} | {cells[0]} | {cells[1]} |")
    lines.append("\nActivation memory = peak during the step − memory resident before it − the gradients.\n")

    r = run_part(dict(part="decode", device=dev, decode_steps=c["decode_steps"]), cap * 3)
    lines += [f"\n### Decoding {c['decode_steps']} steps ({c['decode_steps'] / 150:g} s of audio), batch 1, default model\n",
              "| method | time | |", "|---|---|---|"]
    if "recurrent_s" in r:
        lines += [f"| recurrent state (prefill + step) | {r['recurrent_s']:.1f} s | {c['decode_steps'] / r['recurrent_s']:.0f} steps/s |",
                  f"| re-feeding the sequence, first 150 steps | {r['refeed_150_s']:.1f} s | recurrent: {r['recurrent_150_s']:.1f} s, "
                  f"{r['refeed_150_s'] / r['recurrent_150_s']:.1f}× faster |",
                  f"| re-feeding, all {c['decode_steps']} steps (Σ of measured forwards) | {r['refeed_estimate_s']:.0f} s | "
                  f"recurrent {r['refeed_estimate_s'] / r['recurrent_s']:.0f}× faster |"]
    print("decode", r, flush=True)

    r = run_part(dict(part="generate", device=dev, decode_steps=c["decode_steps"]), cap * 3)
    lines += [f"\n### generate.py end to end: {c['decode_steps'] / 150:g} s per prompt (tokens with cfg 3, Encodec decode, MP3)\n",
              "| prompts | tokens | total |", "|---|---|---|"]
    for b in (1, 4):
        if f"batch{b}" in r:
            lines.append(f"| {b} | {r[f'batch{b}']['tokens_s']:.1f} s | {r[f'batch{b}']['total_s']:.1f} s |")
    print("generate", r, flush=True)

    r = run_part(dict(part="codec", device=dev), cap)
    if "encode_x_realtime" in r:
        lines += ["\n### Encodec 48 kHz (batch 4 × 10 s)\n",
                  f"Encode: {r['encode_x_realtime']:.1f} audio-seconds per second; decode: {r['decode_x_realtime']:.1f}.\n"]
    print("codec", r, flush=True)

    if not os.path.exists(c["output"]):
        with open(c["output"], "w") as f:
            f.write("# Benchmarks\n\nWritten by `python bench.py`. Figures from different machines are in separate sections "
                    "and are never compared with each other.\n")
    with open(c["output"], "a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended to {c['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
