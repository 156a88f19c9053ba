"""
The training loop, started by deploy.py (which reads the data and hands it over): AdamW with warm-up and
cosine decay, gradient accumulation, DDP, bf16 autocast on CUDA, an exponential moving average (EMA) of the
weights, an evaluation every eval_interval steps (scoring.py), checkpoints that resume exactly
(checkpoint.py), and the run folder to watch (watch.py).
"""
import contextlib
import copy
import math
import os
import signal
import time
import warnings
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import torch

import checkpoint
import codec
import common
import model as M
import watch
import scoring
from settings import UserError, first_line, stopped

def train(config, data, rank, world, device, ckpt=None, init=None, resume_hint=""):
    """Train on `data` (deploy.Data) with `config` (deploy.py's settings, resolved). ckpt: a checkpoint to
    resume exactly; init: model weights to start a new run from (--init_from). Returns the raw model."""
    c = SimpleNamespace(**config)
    master, cuda = rank == 0, device.startswith("cuda")
    torch.manual_seed(c.seed + rank)
    autocast = torch.autocast("cuda", dtype=getattr(torch, c.dtype)) if cuda and c.dtype != "float32" else contextlib.nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    text_encoder = checkpoint.TextEncoder(c.text_encoder, device)
    text_encoder.encode_all(set(data.texts) | {""})    # once per distinct text, before training starts
    raw_model, optimizer = build(c, data.n_q, text_encoder.dim, device)
    ema = EMA(raw_model, c.ema_decay) if c.ema_decay > 0 else None
    step, best_val = restore(ckpt, init, raw_model, ema, optimizer, rank, device)
    judge = ema.model if ema is not None else raw_model   # validation and samples use the EMA weights
    model = compile_for_training(raw_model) if c.compile else raw_model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)
    data_info = data.info(c)
    monitor = start_watching(c, config, data, data_info, raw_model, world, device, step, best_val, ckpt) if master else None
    chosen = (ckpt or {}).get("sampling")          # the run's own sampling settings, once its evaluation chose them
    evaluation = scoring.Evaluation(data, c, data_info, text_encoder, raw_model.cfg.vocab, device, autocast, monitor, not ckpt,
                            chosen) if master else None
    progress = Progress(step, c.max_steps, (ckpt or {}).get("elapsed_s", 0))
    save = Checkpointer(c, config, data_info, raw_model, ema, optimizer, world, device, master, progress, chosen)
    save.saved = step if ckpt else None

    batches = iter(data.loader(step, c, rank, world, cuda))
    stop, t_last, tokens_seen, bad_steps, logged = StopSignal(world), time.time(), 0, 0, step
    try:
        while step < c.max_steps:
            if c.feature_redraw_interval and step % c.feature_redraw_interval == 0 and step > 0:
                raw_model.redraw_features(step // c.feature_redraw_interval)
            try:
                losses, grad_norm, n_tokens, finite = optimizer_step(model, raw_model, optimizer, batches, c, step,
                                                                     text_encoder, data.n_q, device, autocast, world)
            except Exception:
                if stop.signal is None:
                    raise
                optimizer.zero_grad(set_to_none=True)   # Ctrl-C reached the loader's workers: this step is redone on resume
                break
            bad_steps = 0 if finite else bad_steps + 1
            if not finite:
                check_divergence(bad_steps, step, c, save.path, master)
            step += 1
            if finite and ema is not None:
                ema.update(raw_model, step)
            tokens_seen += n_tokens
            # a line every log_interval steps, and also after the first step and when 30 s passed without one (unless
            # the next regular line is only seconds away)
            quiet = time.time() - t_last
            if master and (step % c.log_interval == 0 or step == c.max_steps or logged == progress.first
                           or quiet >= 30 and (c.log_interval - step % c.log_interval) * quiet / (step - logged) > 10):
                log_progress(monitor, step, step - logged, c, losses, grad_norm, optimizer, tokens_seen * world,
                             time.time() - t_last, device, progress)
                t_last, tokens_seen, logged = time.time(), 0, step
            if step % c.eval_interval == 0 or step == c.max_steps:
                if master:
                    best_val = evaluation(judge, step, best_val, last=step == c.max_steps)
                    save.sampling = evaluation.chosen
                save(step, best_val, "evaluation")
                if master:
                    with watch.side_output(f"loss.png and index.html at step {step}"):
                        monitor.plot()
            if master and c.sample_interval and (step % c.sample_interval == 0 or step == c.max_steps):
                with watch.side_output(f"the samples of step {step}"):
                    watch.write_samples(judge, text_encoder, c, data_info, step, c.out, device, evaluation.sampling)
                monitor.page()
            if stop.requested():
                break
        if step < c.max_steps:                 # stopped (Ctrl-C, SIGTERM): nothing after this run starts (exit status 130)
            save(step, best_val, "stopped by signal")
            if master:
                monitor.page("stopped", step)
            raise (stopped(f"the run is saved at step {step} in {save.path}; continue with: {resume_hint}") if master
                   else SystemExit(130))
        if master:
            monitor.page("finished")
            print(f"done: {step} steps, " + (f"best validation loss {best_val:.4f}" if len(data.val_ids) else
                  f"no validation set ({len(data)} clip(s): too few to hold any out)") + f"; checkpoint {save.path}")
        return raw_model
    except Exception as e:
        if world > 1 and lost_a_process(e):     # one line in the project's words instead of gloo's/NCCL's traceback
            raise UserError(f"another process of this run stopped (this is rank {rank} of {world}; torchrun's report names "
                            f"the one that failed), so this one stops too ({first_line(e, 100)}). The last checkpoint is "
                            + (f"{save.path} at step {save.saved}" if save.saved is not None else "none: no checkpoint was written yet")
                            + f"; continue with: {resume_hint}") from None
        raise
    finally:
        stop.restore()
        del batches


def lost_a_process(error):
    """Whether an error is a collective that failed because another process of the run is gone."""
    import torch.distributed as dist
    text = str(error)
    return isinstance(error, getattr(dist, "DistError", ())) or isinstance(error, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo", "NCCL"))


# -----------------------------------------------------------------------------
# one optimizer step

def lr_at(step, c):
    """Linear warm-up to lr, then cosine decay to min_lr over lr_decay_steps (default max_steps)."""
    decay_steps = c.lr_decay_steps or c.max_steps
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    progress = min(1.0, (step - c.warmup_steps) / max(1, decay_steps - c.warmup_steps))
    return c.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (c.lr - c.min_lr)


def optimizer_step(model, raw_model, optimizer, batches, c, step, text_encoder, n_q, device, autocast, world):
    """One optimizer step over grad_accum micro-batches (gradients synchronised once). Returns the mean
    loss per codebook (n_q,), the gradient norm, the number of scored codes and whether the step was
    finite (if not, no update is made)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, c)
    losses, tokens_seen = torch.zeros(n_q, device=device), 0
    for micro in range(c.grad_accum):
        codes, texts = next(batches)
        tokens, targets, text, mask = scoring.batch_tensors(codes, texts, text_encoder, c.pattern, raw_model.cfg.vocab, device)
        sync = contextlib.nullcontext() if world == 1 or micro == c.grad_accum - 1 else model.no_sync()
        try:
            with sync, autocast:
                loss, per_codebook = M.codebook_loss(model(tokens, text, mask, start=crop_start(c, step, micro)), targets)
                (loss / c.grad_accum).backward()
        except torch.cuda.OutOfMemoryError:
            raise UserError(f"out of GPU memory with batch_size={c.batch_size} × seq_len={c.seq_len}: lower "
                            "--batch_size (raise --grad_accum to keep the effective batch) or --seq_len") from None
        losses += per_codebook / c.grad_accum
        tokens_seen += int((targets >= 0).sum())
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), c.grad_clip if c.grad_clip > 0 else float("inf"))
    finite = bool(torch.isfinite(grad_norm) and torch.isfinite(losses).all())
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return losses, grad_norm, tokens_seen, finite


def build(c, n_q, text_dim, device):
    """The model and its optimizer (weight decay on matrices only; fused AdamW on CUDA)."""
    try:
        cfg = M.ModelConfig(n_q=n_q, text_dim=text_dim, seed=c.seed, **{k: getattr(c, k) for k in M.MODEL_SETTINGS}).validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    # weights, gradients, AdamW's two moments and the EMA copy, before any activation
    what = f"training a model of {cfg.num_params() / 1e6:.0f} M parameters (dim={c.dim}, depth={c.depth})"
    common.check_memory(4 * cfg.num_params(), "cpu", what)
    common.check_memory(4 * cfg.num_params() * (5 if c.ema_decay > 0 else 4), device, what)
    try:
        model = M.MusicTransformer(cfg).to(device)
    except (RuntimeError, MemoryError) as e:
        raise UserError(f"cannot build a model of dim={c.dim}, depth={c.depth} on {device} ({first_line(e)}): "
                        "choose a smaller model") from None
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=c.weight_decay), dict(params=no_decay, weight_decay=0.0)],
                                  lr=c.lr, betas=(0.9, 0.95), fused=device.startswith("cuda"))
    return model, optimizer


def crop_start(c, step, micro):
    """The position a training crop starts at: 0, or with random_offsets (absolute positions) a draw below
    max_len - seq_len + 1, a function of (seed, step, micro-batch) so that a resumed run draws the same,
    so that every position up to max_len is trained, not only the first seq_len."""
    if not c.random_offsets or c.positions != "absolute" or c.max_len <= c.seq_len:
        return 0
    return int(np.random.default_rng([c.seed, step, micro, 7]).integers(0, c.max_len - c.seq_len + 1))


def compile_for_training(model, backend="inductor"):
    """torch.compile for the training loop: returns what to call instead of the model (the same weights).
    Dynamo cannot trace the reversible stack whole (a custom autograd.Function that records random
    states; it would run uncompiled, silently), so there each residual branch is compiled whole
    (fullgraph), for the forward pass and for the backward pass's recomputation; decoding, evaluation and
    copies of the model stay uncompiled. Dropout draws its masks as uncompiled code does (inductor's
    fallback_random), from the random state that the backward pass restores, so the recomputation
    replays the forward's masks. Without reversible layers: the whole forward."""
    options = dict(backend=backend, options=dict(fallback_random=True) if backend == "inductor" else None)
    if not model.cfg.reversible:
        return torch.compile(model, **options)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)   # 4 kinds of branch × grad modes × autocast
    for block in model.blocks:
        block.compiled = tuple(torch.compile(branch, fullgraph=True, **options) for branch in (block.f, block.g))
    return model


# -----------------------------------------------------------------------------
# the weights' average, stopping, resuming, saving

class EMA:
    """An exponential moving average of the weights, in a model of its own (used for validation, samples
    and, by default, generate.py). After optimizer step t: ema += (1 - d)(weights - ema), with
    d = min(decay, (1 + t) / (10 + t)): a short warm-up, so that early on it is not mostly the random init."""

    def __init__(self, model, decay):
        self.decay, self.model = decay, copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step):
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1 - d)
        for mine, theirs in zip(self.model.buffers(), model.buffers()):   # the FAVOR+ features follow their redraws
            mine.copy_(theirs)


class StopSignal:
    """SIGTERM or Ctrl-C asks the loop to stop at the end of the step; every rank stops at the same one."""

    def __init__(self, world):
        self.world, self.signal = world, None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.signal = signum

    def requested(self):
        flag = torch.tensor(float(self.signal is not None))
        if self.world > 1:
            torch.distributed.all_reduce(flag)
        return bool(flag.item())

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def rng_state(device):
    """This process's random state: the CPU generator, and its GPU's when it has one."""
    return dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.startswith("cuda") else None)


def restore(ckpt, init, model, ema, optimizer, rank, device):
    """Put a checkpoint back (weights, EMA, optimizer, this rank's random state) or start from `init`
    weights. Returns (step, best validation loss)."""
    if ckpt is None:
        if init is not None:
            model.load_state_dict(init)
            if ema is not None:
                ema.model.load_state_dict(init)
        return 0, float("inf")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ema is not None:
        ema.model.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
    saved = ckpt["rng"][rank % len(ckpt["rng"])]   # with a new world size, ranks reuse the saved streams
    torch.set_rng_state(saved["cpu"].cpu())
    if device.startswith("cuda") and saved["cuda"] is not None:
        torch.cuda.set_rng_state(saved["cuda"].cpu(), device)
    return ckpt["step"], ckpt["best_val_loss"]


class Progress:
    """Where the run is: the time it has run (over all its processes: a resumed run carries the count on) and
    the time it has left at the pace of this process so far (evaluations and samples included)."""

    def __init__(self, step, total, elapsed_before):
        self.first, self.total, self.before, self.t0 = step, total, elapsed_before, time.time()

    def __call__(self, step):
        took = time.time() - self.t0
        left = (self.total - step) * took / (step - self.first) if step > self.first else None
        return dict(elapsed_s=round(self.before + took), eta_s=None if left is None else round(left))


class Checkpointer:
    """save(step, best_val, why): every rank calls it at the same step (their random states are gathered);
    rank 0 writes ckpt.pt through checkpoint.save_checkpoint."""

    def __init__(self, c, config, data_info, model, ema, optimizer, world, device, master, progress, sampling):
        self.c, self.config, self.data_info, self.model, self.ema, self.optimizer = c, config, data_info, model, ema, optimizer
        self.world, self.device, self.master, self.progress = world, device, master, progress
        self.path = os.path.join(c.out, "ckpt.pt")
        self.sampling = sampling    # the run's own sampling settings, once its evaluation has chosen them
        self.saved = None           # the step of the last checkpoint written (or resumed from)

    def __call__(self, step, best_val, why):
        states = [rng_state(self.device)]
        if self.world > 1:
            states = [None] * self.world
            torch.distributed.all_gather_object(states, rng_state(self.device))
        if not self.master:
            self.saved = step
            return
        c = self.c
        checkpoint.save_checkpoint(self.path, dict(
            step=step, best_val_loss=best_val, config=self.config, data=self.data_info, model_config=asdict(self.model.cfg),
            model=self.model.state_dict(), ema=self.ema.model.state_dict() if self.ema else None,
            optimizer=self.optimizer.state_dict(), rng=states, elapsed_s=self.progress(step)["elapsed_s"], sampling=self.sampling,
            data_position=dict(next_step=step, samples_per_step=c.batch_size * c.grad_accum * self.world)))
        self.saved = step
        print(f"saved {self.path} at step {step} ({why})")


# -----------------------------------------------------------------------------
# what the console says

def start_watching(c, config, data, data_info, model, world, device, step, best_val, ckpt):
    """Rank 0's start: what is about to happen, a codec that will be there for the samples, the baselines."""
    announce(c, data, model, world, device, step, best_val, c.init_from and not ckpt)
    if c.sample_interval or c.quality_samples:
        codec.codec_for(data_info, c.codec_weights, "cpu")   # fail now, not hours in, if the codec is missing
    monitor = watch.Monitor(c.out, config, step if ckpt else None)
    if not ckpt:
        found = scoring.baselines(data, c, model.cfg.vocab)
        if found:
            monitor.log(dict(step=0, **found))
            print(f"baselines on the validation clips: uniform {found['baseline_uniform']:.3f}, unigram "
                  f"{found['baseline_unigram']:.3f}, bigram {found['baseline_bigram']:.3f} nats ({found['baseline_fit']}): "
                  "a model that does not go below the bigram has learnt nothing a lookup table could not")
    return monitor


def announce(c, data, model, world, device, step, best_val, fine_tune):
    print(f"{len(data)} clips ({len(data.train_ids)} train, {len(data.val_ids)} validation) in {len(data.paths)} shards, "
          f"codec {data.attrs['codec']}")
    print(f"model: {model.num_params() / 1e6:.1f} M parameters, {c.depth} layers × {c.dim}, attention={c.attention}, "
          f"positions={c.positions}, pattern={c.pattern}, text encoder {c.text_encoder}"
          + (f"; starting from the weights of {c.init_from}" if fine_tune else ""))
    print(f"effective batch = {c.batch_size} clips × {c.grad_accum} accumulation × {world} processes = "
          f"{c.batch_size * c.grad_accum * world} clips of {c.seq_len} steps per optimizer step; device {device}"
          + (f", autocast {c.dtype}" if device.startswith("cuda") else "") + (f"; EMA of the weights, decay {c.ema_decay}" if c.ema_decay else ""))
    if not len(data.val_ids):
        print(f"NOTE: no validation set ({len(data)} clip(s), val_fraction={c.val_fraction}): no validation loss, "
              "conditioning gap or best checkpoint to judge the run by; give it more clips")
    real = np.minimum(data.lengths[data.train_ids], c.seq_len).mean() / c.seq_len
    if real < 0.5:
        print(f"NOTE: the training clips are shorter than seq_len={c.seq_len} steps: on average {real:.0%} of a crop is "
              f"audio, the rest padding (not scored, but computed): --seq_len={int(np.median(data.lengths))} (the clips' "
              "median length) trains as much for less")
    if step:
        print(f"resuming from step {step} (best validation loss {best_val:.4f})")


def check_divergence(bad_steps, step, c, ckpt_path, master):
    if master:
        warnings.warn(f"step {step}: non-finite loss or gradient, update skipped ({bad_steps} in a row)")
    if bad_steps >= c.max_bad_steps:
        raise UserError(f"{bad_steps} non-finite steps in a row at step {step}: training diverged. The last good "
                        f"checkpoint is {ckpt_path}; resume with a lower --lr (now {c.lr}) or --grad_clip, or check the data")


def log_progress(monitor, step, steps_done, c, losses, grad_norm, optimizer, tokens, seconds, device, progress):
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else _rss_gib()
    record = dict(step=step, loss=round(losses.mean().item(), 5), loss_per_codebook=[round(x, 5) for x in losses.tolist()],
                  lr=optimizer.param_groups[0]["lr"], grad_norm=round(grad_norm.item(), 4),
                  tokens_per_s=round(tokens / seconds, 1), ms_per_step=round(1000 * seconds / steps_done, 1),
                  peak_mem_gib=round(peak, 3), total_steps=c.max_steps, **progress(step))
    monitor.log(record)
    left = f", {watch.clock(record['eta_s'])} left" if record["eta_s"] is not None and step < c.max_steps else ""
    print(f"step {step}/{c.max_steps} ({step / c.max_steps:.0%}): loss {record['loss']:.4f} "
          f"({' '.join(f'{x:.3f}' for x in record['loss_per_codebook'])}) lr {record['lr']:.2e} |g| {record['grad_norm']:.3f} "
          f"{record['tokens_per_s']:.0f} tok/s {record['ms_per_step']:.0f} ms/step {peak:.2f} GiB · "
          f"{watch.clock(record['elapsed_s'])} elapsed{left}", flush=True)
    with watch.side_output(f"loss.png at step {step}"):
        monitor.plot(every=120)      # the curves from the first steps on, redrawn every few minutes (and at each evaluation)


def _rss_gib():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


if __name__ == "__main__":      # a nanoGPT user's first guess: runs start with deploy.py, which hands the loop its data
    import sys
    print("train.py holds the training loop; runs start with deploy.py, which reads the shards and hands it the data: "
          "python deploy.py --data=data/ --out=runs/mine (python deploy.py --help lists every setting)",
          file=sys.stdout if {"--help", "-h"} & set(sys.argv[1:]) else sys.stderr)
    sys.exit(0 if {"--help", "-h"} & set(sys.argv[1:]) else 2)
