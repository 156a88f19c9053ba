"""
The training loop, used by deploy.py: AdamW with warm-up and cosine decay, gradient accumulation,
DDP, bf16 autocast on CUDA, validation, checkpoints that resume exactly, logs, loss.png and audio
samples as training goes.
"""
import contextlib
import glob
import json
import math
import os
import signal
import time
import warnings
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import torch

import common
import deploy
import model as M
from common import UserError

CHECKPOINT_FORMAT = 1


def lr_at(step, c):
    """Linear warm-up to lr, then cosine decay to min_lr over lr_decay_steps (default max_steps)."""
    decay_steps = c.lr_decay_steps or c.max_steps
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    progress = min(1.0, (step - c.warmup_steps) / max(1, decay_steps - c.warmup_steps))
    return c.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (c.lr - c.min_lr)


def batch_tensors(codes, texts, text_encoder, pattern, vocab, device):
    """codes (B, n_q, T) with UNKNOWN padding → model inputs, targets and the encoded text, on device."""
    targets = M.to_layout(codes, pattern)
    tokens = M.inputs_from_targets(targets, vocab)
    text, mask = text_encoder(texts, device)
    return tokens.to(device, non_blocking=True), targets.to(device, non_blocking=True), text, mask


# -----------------------------------------------------------------------------
# checkpoints: plain tensors and Python values only, so torch.load(weights_only=True) reads them

def rng_state(device):
    """This process's random state: the CPU generator, and its GPU's when it has one."""
    return dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.startswith("cuda") else None)


def save_checkpoint(path, raw_model, optimizer, step, best_val, config, data_info, rng_states):
    """rng_states: one rng_state() per rank, so that every rank resumes its own dropout stream."""
    state = dict(
        format=CHECKPOINT_FORMAT, step=step, best_val_loss=best_val, config=config, data=data_info,
        model_config=asdict(raw_model.cfg), model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
        rng=rng_states,
        data_position=dict(next_step=step, samples_per_step=config["batch_size"] * config["grad_accum"] * config["world_size"]))
    with common.disk_errors(path, f"the previous checkpoint {os.path.basename(path)} is intact"), \
            common.atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)   # to a Python file, so a full disk surfaces as an OSError


def load_checkpoint(path, device="cpu"):
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}: check the path (train one with deploy.py)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception:
        ckpt = None   # torch's own message suggests unsafe loading: never repeat that advice
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model_config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by this project's deploy.py (it is not a file of plain "
                        "tensors in its format): check the path")
    return ckpt


# -----------------------------------------------------------------------------
# watching a run

class Monitor:
    """metrics.jsonl, loss.png, and optional TensorBoard / wandb. Only rank 0 makes one."""

    def __init__(self, out_dir, config, resume_step):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.records = []
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path, errors="replace") as f:   # drop what a crashed run logged after its last checkpoint
                self.records = [r for r in map(_json_or_none, f) if r and r.get("step", resume_step + 1) <= resume_step]
            with common.atomic_path(self.path) as tmp, open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)
        elif os.path.exists(self.path):
            os.remove(self.path)
        self.tb = self.wb = None
        if config["tensorboard"]:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except ImportError:
                raise UserError("tensorboard=True needs the tensorboard package: pip install tensorboard") from None
        if config["wandb"]:
            try:
                import wandb
            except ImportError:
                raise UserError("wandb=True needs the wandb package: pip install wandb") from None
            self.wb = wandb.init(project=config["wandb_project"], config=config, dir=out_dir, resume="allow",
                                 name=os.path.basename(os.path.abspath(out_dir)))

    def log(self, record):
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wb:
            self.wb.log(scalars, step=record["step"])

    def plot(self, out_dir):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for points, name in ((train, "train"), (val, "validation")):
            if points:
                ax.plot(*zip(*points), label=name, marker="o" if name == "validation" else None)
        ax.set_xlabel("step"); ax.set_ylabel("cross-entropy (nats, mean over codebooks)"); ax.legend(); ax.grid(alpha=0.3)
        with common.atomic_path(os.path.join(out_dir, "loss.png")) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)


def _json_or_none(line):
    """A metrics line, or None for one that a crash cut off: a side file never blocks a resume."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


@torch.no_grad()
def evaluate(raw_model, shards, val_ids, c, text_encoder, device, autocast):
    """Mean validation loss over the first eval_clips held-out clips, each from its start."""
    if len(val_ids) == 0:
        return None
    raw_model.eval()
    ids = val_ids[:c.eval_clips]
    total, count = 0.0, 0
    for i in range(0, len(ids), c.batch_size):
        chunk = ids[i:i + c.batch_size]
        codes = torch.from_numpy(np.stack([shards.read(int(j), 0, c.seq_len) for j in chunk]))
        tokens, targets, text, mask = batch_tensors(codes, [shards.texts[int(j)] for j in chunk], text_encoder,
                                                    c.pattern, raw_model.cfg.vocab, device)
        with autocast:
            loss, _ = raw_model.loss(tokens, targets, text, mask)
        total, count = total + loss.item() * len(chunk), count + len(chunk)
    raw_model.train()
    return total / count


def write_samples(raw_model, text_encoder, c, data_info, step, out_dir, device):
    """A short piece per sample prompt, from the model's own sampler, into out/samples/."""
    raw_model.eval()
    prompts = data_info["sample_prompts"]
    codes = M.sample(raw_model, text_encoder, prompts, int(c.sample_seconds * common.FRAME_RATE), device, seed=step,
                     cfg=3.0 if c.cond_dropout > 0 else 1.0)
    codec = common.codec_for(data_info, c.codec_weights, device)
    folder = os.path.join(out_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    with torch.no_grad():
        audio = common.decode_codes(codec, codes, data_info["typical_scale"]).cpu()
    for prompt, wav in zip(prompts, audio):
        common.write_audio(os.path.join(folder, f"step{step:06d}_{common.slug(prompt)}.mp3"), wav)
    raw_model.train()


# -----------------------------------------------------------------------------

def train(config, shards, rank, world, device, cli_overrides=(), resume_hint=""):
    master = rank == 0
    out_dir = config["out"]
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    ckpt = None
    if not config["resume"] and os.path.exists(ckpt_path):
        raise UserError(f"{out_dir} already holds a run (ckpt.pt): add --resume to continue it, or choose another --out")
    if config["resume"]:
        ckpt = load_checkpoint(ckpt_path)
        saved = ckpt["config"]
        changed = [k for k in cli_overrides if k in deploy.MODEL_SETTINGS and config[k] != saved[k]]
        if changed:
            was = ", ".join(f"{k}={saved[k]}" for k in changed)
            raise UserError(f"cannot change {', '.join(changed)} when resuming: the checkpoint's model has {was}")
        # settings a checkpoint predates take the value that reproduces it: its model_config's (dataclass) defaults
        model_settings = {k: v for k, v in ckpt["model_config"].items() if k in deploy.MODEL_SETTINGS}
        config = {**config, **ckpt["config"], **model_settings, **{k: config[k] for k in cli_overrides}, "resume": True}
    config["world_size"] = world
    c = SimpleNamespace(**config)
    common.check_ranges(config, deploy.RANGES)
    if c.seq_len > c.max_len:
        raise UserError(f"seq_len={c.seq_len} is longer than the model's max_len={c.max_len}: lower --seq_len or raise --max_len")
    if master:
        common.check_writable(out_dir, "out")
        common.remove_stale_temps(glob.escape(ckpt_path))    # left by checkpoint writes that were killed

    torch.manual_seed(c.seed + rank)
    cuda = device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=getattr(torch, c.dtype)) if cuda and c.dtype != "float32" else contextlib.nullcontext()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    text_encoder = M.TextEncoder(c.text_encoder, device)
    text_encoder.encode_all(set(shards.texts) | {""})    # once per distinct text, before training starts
    model_cfg = M.ModelConfig(n_q=shards.n_q, text_dim=text_encoder.dim, seed=c.seed,
                              **{k: config[k] for k in deploy.MODEL_SETTINGS})
    try:
        model_cfg.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        raw_model = M.MusicTransformer(model_cfg).to(device)
    except (RuntimeError, MemoryError) as e:
        raise UserError(f"cannot build a model of dim={c.dim}, depth={c.depth} on {device} ({str(e).splitlines()[0][:120]}): "
                        "choose a smaller model") from None
    decay = [p for p in raw_model.parameters() if p.dim() >= 2]
    no_decay = [p for p in raw_model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=c.weight_decay), dict(params=no_decay, weight_decay=0.0)],
                                  lr=c.lr, betas=(0.9, 0.95), fused=cuda)
    step, best_val = 0, float("inf")
    train_ids, val_ids = deploy.split(len(shards), c.val_fraction, c.seed)
    texts = [t for t in dict.fromkeys(shards.texts[i] for i in train_ids) if t][:3]
    data_info = dict(shards.attrs, typical_scale=shards.typical_scale, codec_weights=c.codec_weights,
                     clips=len(shards), sample_prompts=c.sample_prompts.split("|") if c.sample_prompts else texts or [""])
    if ckpt:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, best_val = ckpt["step"], ckpt["best_val_loss"]
        saved = ckpt["rng"][rank % len(ckpt["rng"])]   # with a new world size, ranks reuse the saved streams
        torch.set_rng_state(saved["cpu"].cpu())
        if cuda and saved["cuda"] is not None:
            torch.cuda.set_rng_state(saved["cuda"].cpu(), device)
        del ckpt
    model = raw_model
    if c.compile:
        model = torch.compile(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)

    if master:
        os.makedirs(out_dir, exist_ok=True)
        print(f"{len(shards)} clips ({len(train_ids)} train, {len(val_ids)} validation) in {len(shards.paths)} shards, "
              f"codec {shards.attrs['codec']}")
        print(f"model: {raw_model.num_params() / 1e6:.1f} M parameters, {c.depth} layers × {c.dim}, attention={c.attention}, "
              f"pattern={c.pattern}, text encoder {c.text_encoder}")
        print(f"effective batch = {c.batch_size} clips × {c.grad_accum} accumulation × {world} processes = "
              f"{c.batch_size * c.grad_accum * world} clips of {c.seq_len} steps per optimizer step; device {device}"
              + (f", autocast {c.dtype}" if cuda else ""))
        if step:
            print(f"resuming from step {step} (best validation loss {best_val:.4f})")
    monitor = Monitor(out_dir, config, step if config["resume"] else None) if master else None
    if master and c.sample_interval:
        common.codec_for(data_info, c.codec_weights, "cpu")   # fail now, not hours in, if the codec is missing

    loader = torch.utils.data.DataLoader(
        deploy.Crops(shards, train_ids, c.seq_len, c.cond_dropout, c.seed),
        batch_sampler=deploy.StepBatches(step, c.max_steps, c.grad_accum, c.batch_size, rank, world),
        collate_fn=deploy.collate, num_workers=c.num_workers, pin_memory=cuda,
        persistent_workers=False, generator=torch.Generator())   # its own generator: the model's RNG stream stays put
    batches = iter(loader)

    stop = {"signal": None}
    def on_signal(signum, frame):
        stop["signal"] = signum
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    bad_steps, t_last, tokens_seen = 0, time.time(), 0

    def checkpoint(why):   # called by every rank at the same step
        states = [rng_state(device)]
        if world > 1:
            states = [None] * world
            torch.distributed.all_gather_object(states, rng_state(device))
        if master:
            save_checkpoint(ckpt_path, raw_model, optimizer, step, best_val, config, data_info, states)
            print(f"saved {ckpt_path} at step {step} ({why})")

    try:
        while step < c.max_steps:
            if c.feature_redraw_interval and step % c.feature_redraw_interval == 0 and step > 0:
                raw_model.redraw_features(step // c.feature_redraw_interval)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, c)
            losses = torch.zeros(shards.n_q, device=device)
            interrupted = False
            for micro in range(c.grad_accum):
                try:
                    codes, texts = next(batches)
                except Exception:
                    if stop["signal"] is None:
                        raise
                    interrupted = True   # Ctrl-C reached the loader's workers too
                    break
                tokens, targets, text, mask = batch_tensors(codes, texts, text_encoder, c.pattern, model_cfg.vocab, device)
                last = micro == c.grad_accum - 1
                context = model.no_sync() if world > 1 and not last else contextlib.nullcontext()   # sync once per step
                try:
                    with context, autocast:
                        loss, per_codebook = M.codebook_loss(model(tokens, text, mask), targets)
                        (loss / c.grad_accum).backward()
                except torch.cuda.OutOfMemoryError:
                    raise UserError(f"out of GPU memory with batch_size={c.batch_size} × seq_len={c.seq_len}: lower "
                                    "--batch_size (raise --grad_accum to keep the effective batch) or --seq_len") from None
                losses += per_codebook / c.grad_accum
                tokens_seen += int((targets >= 0).sum())
            if interrupted:   # drop the partial accumulation: this step is redone on resume
                optimizer.zero_grad(set_to_none=True)
                checkpoint("stopped by signal")
                if master:
                    print(f"stopped at step {step}; continue with: {resume_hint}")
                return raw_model
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), c.grad_clip if c.grad_clip > 0 else float("inf"))
            if not (torch.isfinite(grad_norm) and torch.isfinite(losses).all()):
                bad_steps += 1
                optimizer.zero_grad(set_to_none=True)
                if master:
                    warnings.warn(f"step {step}: non-finite loss or gradient, update skipped ({bad_steps} in a row)")
                if bad_steps >= c.max_bad_steps:
                    raise UserError(f"{bad_steps} non-finite steps in a row at step {step}: training diverged. "
                                    f"The last good checkpoint is {ckpt_path}; resume with a lower --lr (now {c.lr}) "
                                    "or --grad_clip, or check the data")
                step += 1
                continue
            bad_steps = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            if master and (step % c.log_interval == 0 or step == c.max_steps):
                dt = time.time() - t_last
                steps_done = c.log_interval if step % c.log_interval == 0 else step % c.log_interval
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else _rss_gib()
                record = dict(step=step, loss=round(losses.mean().item(), 5),
                              loss_per_codebook=[round(x, 5) for x in losses.tolist()], lr=optimizer.param_groups[0]["lr"],
                              grad_norm=round(grad_norm.item(), 4), tokens_per_s=round(tokens_seen * world / dt, 1),
                              ms_per_step=round(1000 * dt / steps_done, 1), peak_mem_gib=round(peak, 3))
                monitor.log(record)
                print(f"step {step}: loss {record['loss']:.4f} ({' '.join(f'{x:.3f}' for x in record['loss_per_codebook'])}) "
                      f"lr {record['lr']:.2e} |g| {record['grad_norm']:.3f} {record['tokens_per_s']:.0f} tok/s "
                      f"{record['ms_per_step']:.0f} ms/step {peak:.2f} GiB", flush=True)
                t_last, tokens_seen = time.time(), 0

            if step % c.eval_interval == 0 or step == c.max_steps:
                val = evaluate(raw_model, shards, val_ids, c, text_encoder, device, autocast)
                if val is not None:
                    best_val = min(best_val, val)
                if master and val is not None:
                    monitor.log(dict(step=step, val_loss=round(val, 5)))
                    print(f"step {step}: validation loss {val:.4f} (best {best_val:.4f})")
                checkpoint("evaluation")
                if master:
                    monitor.plot(out_dir)
            if master and c.sample_interval and (step % c.sample_interval == 0 or step == c.max_steps):
                write_samples(raw_model, text_encoder, c, data_info, step, out_dir, device)

            signalled = torch.tensor(float(stop["signal"] is not None))
            if world > 1:
                torch.distributed.all_reduce(signalled)   # every rank stops at the same step
            if signalled.item():
                checkpoint("stopped by signal")
                if master:
                    print(f"stopped at step {step}; continue with: {resume_hint}")
                return raw_model
        if master:
            print(f"done: {step} steps, best validation loss {best_val:.4f}; checkpoint {ckpt_path}")
        return raw_model
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        del batches


def _rss_gib():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
