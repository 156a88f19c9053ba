"""
The training loop, started by deploy.py: AdamW with warm-up and cosine decay, gradient accumulation, DDP,
bf16 autocast on CUDA, an exponential moving average (EMA) of the weights, validation that measures how
much the model listens to its text, checkpoints that resume exactly, and a run folder to watch:
metrics.jsonl, loss.png, samples/ and index.html (open it in a browser).
"""
import contextlib
import copy
import glob
import html
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

import checkpoint
import common
import decoding
import model as M
import quality
from common import UserError


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


# -----------------------------------------------------------------------------
# how good is it: validation, the conditioning gap, and baselines to beat

def exchanged(labels):
    """Each label replaced by the next distinct one (in sorted order), so no clip keeps its own; None when
    there is only one."""
    distinct = sorted(set(labels))
    other = {text: distinct[(k + 1) % len(distinct)] for k, text in enumerate(distinct)}
    return [other[t] for t in labels] if len(distinct) > 1 else None


@torch.no_grad()
def evaluate(model, data, c, text_encoder, device, autocast):
    """Validation cross-entropy on the first eval_clips held-out clips, from their start: with their own
    labels, with the labels exchanged (each clip gets another label of the set, never its own) and with the
    empty text. conditioning_gap = exchanged − own: how much the model uses its text (about 0: it does not
    listen); left out when the clips share one label, where nothing can be exchanged."""
    ids = [int(i) for i in data.val_ids[:c.eval_clips]]
    if not ids:
        return None
    codes = torch.from_numpy(np.stack([data.read(i, 0, c.seq_len) for i in ids]))
    own = [data.texts[i] for i in ids]
    runs = [("val_loss", own), ("val_loss_shuffled", exchanged(own)), ("val_loss_empty", [""] * len(ids))]
    out = {}
    for name, labels in [r for r in runs if r[1] is not None]:
        total = torch.zeros(data.n_q)
        for i in range(0, len(ids), c.batch_size):
            tokens, targets, text, mask = batch_tensors(codes[i:i + c.batch_size], labels[i:i + c.batch_size], text_encoder,
                                                        c.pattern, model.cfg.vocab, device)
            with autocast:
                _, per_codebook = M.codebook_loss(model(tokens, text, mask), targets)
            total += per_codebook.float().cpu() * len(tokens)
        per_codebook = total / len(ids)
        out[name] = round(per_codebook.mean().item(), 5)
        if name == "val_loss":
            out["val_loss_per_codebook"] = [round(x, 5) for x in per_codebook.tolist()]
    if "val_loss_shuffled" in out:
        out["conditioning_gap"] = round(out["val_loss_shuffled"] - out["val_loss"], 5)
    return out


def spread(ids, n):
    """Up to n of ids, evenly spread over them."""
    return [int(i) for i in ids[::max(1, len(ids) // n)][:n]]


def baselines(data, c, vocab, max_clips=1000):
    """What lookup tables score on the validation clips the model is scored on (quality.baselines), fitted on
    up to max_clips training clips."""
    val = [data.read(i, 0, c.seq_len) for i in data.val_ids[:c.eval_clips]]
    fit = [data.read(i, 0, int(data.lengths[i])) for i in spread(data.train_ids, max_clips)]
    return quality.baselines(fit, val, vocab) if val and fit else {}


def make_reference(data, c, data_info, vocab, device, max_clips=1000):
    """The real side of the sample metrics (quality.Reference) for this run's data, and the fixed prompts
    the samples are made for (the labels of the first quality_samples validation clips, in turn); (None,
    None) where quality_samples=0 or there are no validation clips."""
    if not c.quality_samples or not len(data.val_ids):
        return None, None
    steps = max(1, round(c.quality_seconds)) * common.SEGMENT_STEPS
    clips = lambda ids: [data.read(i, 0, steps) for i in ids]
    val, fit = [int(i) for i in data.val_ids[:c.quality_samples]], spread(data.train_ids, max_clips)
    codec = common.codec_for(data_info, c.codec_weights, device)
    reference = quality.Reference(codec, clips(spread(data.train_ids, c.quality_samples)), clips(val),
                                  [data.texts[i] for i in val], quality.unigram_codes(clips(fit), c.quality_samples, steps, vocab),
                                  clips(fit), [data.texts[i] for i in fit])
    return reference, [data.texts[val[i % len(val)]] for i in range(c.quality_samples)]


@torch.no_grad()
def sample_codes(model, text_encoder, prompts, steps, device, seed, sampling, batch=16):
    """Codes (N, n_q, steps) of samples for `prompts`, batch by batch, with fixed seeds (seed + the batch's first
    index): the same noise at every evaluation, so the curves compare weights and settings, not luck."""
    return torch.cat([decoding.sample(model, text_encoder, prompts[i:i + batch], steps, device, seed=seed + i, **sampling).cpu()
                      for i in range(0, len(prompts), batch)])


@torch.no_grad()
def nll(model, text_encoder, clips, texts, device, batch=16):
    """The model's mean cross-entropy (nats) of clips [(n_q, T)] given their texts, teacher-forced: of its
    own samples, how sure it is of what it made (well below the real clips' figure: the sampler picks
    what it already found likely, as truncation does); of real clips, the validation loss over them."""
    total, count = 0.0, 0
    for i in range(0, len(clips), batch):
        codes = torch.as_tensor(np.stack([np.asarray(c) for c in clips[i:i + batch]])).long()
        tokens, targets, text, mask = batch_tensors(codes, list(texts[i:i + batch]), text_encoder, model.cfg.pattern,
                                                    model.cfg.vocab, device)
        _, per_codebook = M.codebook_loss(model(tokens, text, mask), targets)
        total, count = total + per_codebook.mean().item() * len(codes), count + len(codes)
    return round(total / max(1, count), 5)


def score_samples(model, text_encoder, reference, prompts, c, device, sampling):
    """Samples made for the fixed prompts with `sampling`, scored against the real clips: FAD, KAD, label
    adherence, the code statistics (repeats, distinct codes per second) and the model's NLL of them."""
    steps = max(1, round(c.quality_seconds)) * common.SEGMENT_STEPS
    codes = sample_codes(model, text_encoder, prompts, steps, device, c.seed, sampling)
    return dict(reference.score(list(codes.numpy()), prompts), sample_nll=nll(model, text_encoder, codes, prompts, device))


def score_grid(model, text_encoder, reference, prompts, c, device, grid):
    """[(sampling, its scores)] for each sampling settings of `grid`, and the real clips' NLL (a row of its own)."""
    return [(s, score_samples(model, text_encoder, reference, prompts, c, device, s)) for s in grid]


def n(x):
    """A measure for a console line: 3 significant digits, or – where it could not be measured."""
    return "–" if x is None else f"{x:.3g}"


SAMPLE_COLUMNS = [("fad", "FAD"), ("kad", "KAD"), ("adherence", "adherence"), ("repeats", "repeats"),
                  ("distinct_per_s", "distinct codes/s"), ("sample_nll", "NLL of own samples")]


def sampling_table(scored, references, chosen=None):
    """The sampling study's table: a row per setting, beside the real clips' and the unigram noise's rows."""
    real = dict(fad=references.get("fad_real"), kad=references.get("kad_real"), adherence=references.get("adherence_real"),
                repeats=references.get("repeats_real"), distinct_per_s=references.get("distinct_per_s_real"),
                sample_nll=references.get("nll_real"))
    noise = dict(fad=references.get("fad_noise"), kad=references.get("kad_noise"), adherence=references.get("adherence_chance"),
                 repeats=references.get("repeats_noise"), distinct_per_s=references.get("distinct_per_s_noise"))
    rows = [("real clips (FAD/KAD: training clips; the rest: validation clips)", real),
            ("unigram noise (adherence: chance)", noise)]
    rows += [(decoding.describe(s) + ("   ← chosen" if s == chosen else ""), r) for s, r in scored]
    width = max(len(name) for name, _ in rows)
    lines = ["sampling".ljust(width) + "".join(f"  {title:>9}" for _, title in SAMPLE_COLUMNS)]
    lines += [name.ljust(width) + "".join(f"  {n(r.get(k)):>9}" for k, _ in SAMPLE_COLUMNS) for name, r in rows]
    return "\n".join(lines)


class Evaluation:
    """Rank 0's evaluation every eval_interval steps: the validation loss and the conditioning gap, then
    samples made with the run's sampling settings, scored against the references made once at the start.
    The last evaluation of a run scores every setting of sampling_grid and chooses the run's own (the
    lowest KAD among those whose label adherence is within reach of the best), which its checkpoint keeps
    and generate.py and app.py use."""

    def __init__(self, data, c, data_info, text_encoder, vocab, device, autocast, monitor, new_run, chosen):
        self.data, self.c, self.text_encoder, self.device, self.autocast, self.monitor = data, c, text_encoder, device, autocast, monitor
        self.chosen, self.grid = chosen, sampling_grid(c)
        self.reference, self.prompts = make_reference(data, c, data_info, vocab, device)
        if self.reference is not None and new_run:
            r = self.reference.references
            monitor.log(dict(step=0, **r))
            print(f"samples will be compared with {len(self.reference.val_clips)} validation clips in the codec's latent "
                  f"({c.quality_seconds:g} s each): real training clips score FAD {n(r['fad_real'])}, KAD {n(r['kad_real'])} "
                  f"(the floor), unigram noise FAD {n(r['fad_noise'])}, KAD {n(r['kad_noise'])}; label adherence of the "
                  + (f"real clips {n(r['adherence_real'])} (chance {n(r['adherence_chance'])})" if r["adherence_real"] is not None
                     else f"clips: not measurable ({self.reference.unmeasurable})"))

    def __call__(self, model, step, best_val, last=False):
        found = evaluate(model, self.data, self.c, self.text_encoder, self.device, self.autocast)
        if found is None:
            return best_val
        best_val = min(best_val, found["val_loss"])
        gap = (f"labels exchanged {found['val_loss_shuffled']:.4f}, empty text {found['val_loss_empty']:.4f}: conditioning "
               f"gap {found['conditioning_gap']:+.4f}" if "conditioning_gap" in found else
               f"empty text {found['val_loss_empty']:.4f}; conditioning gap: not measurable, the validation clips all have "
               "one label (raise val_fraction or eval_clips)")
        print(f"step {step}: validation loss {found['val_loss']:.4f} (best {best_val:.4f}); {gap}")
        if self.reference is not None:
            r = self.reference
            found["nll_real"] = nll(model, self.text_encoder, r.val_clips, r.val_labels, self.device)
            refs = dict(r.references, nll_real=found["nll_real"])
            if last and len(self.grid) > 1:
                scored = score_grid(model, self.text_encoder, r, self.prompts, self.c, self.device, self.grid)
                self.chosen = quality.choose_sampling(scored) or self.chosen
                print(f"step {step}: sampling settings scored ({len(self.prompts)} samples each; lower KAD: closer to the "
                      f"real clips):\n{sampling_table(scored, refs, self.sampling)}")
                found.update(next(x for s, x in scored if s == self.sampling))
                found["sampling_scores"] = [dict(sampling=s, **x) for s, x in scored]
                print(f"step {step}: this run's own sampling: {decoding.describe(self.sampling)} (kept in its checkpoint; "
                      "generate.py and app.py use it unless told otherwise)")
            else:
                found.update(score_samples(model, self.text_encoder, r, self.prompts, self.c, self.device, self.sampling))
            print(f"step {step}: samples ({decoding.describe(self.sampling)}) FAD {n(found['fad'])} (real {n(refs['fad_real'])}, "
                  f"noise {n(refs['fad_noise'])}), KAD {n(found['kad'])} (real {n(refs['kad_real'])}, noise {n(refs['kad_noise'])}), "
                  "label adherence " + (f"{n(found['adherence'])} (real {n(refs['adherence_real'])}, chance "
                                        f"{n(refs['adherence_chance'])})" if found["adherence"] is not None else "not measurable")
                  + f"; repeats {n(found['repeats'])} (real {n(refs['repeats_real'])}), distinct codes/s {n(found['distinct_per_s'])} "
                  f"(real {n(refs['distinct_per_s_real'])}), NLL of own samples {n(found['sample_nll'])} (real clips "
                  f"{n(refs['nll_real'])})")
            found["sampling"] = dict(self.sampling)
        self.monitor.log(dict(step=step, **found))
        return best_val

    @property
    def sampling(self):
        """The run's sampling settings: its own once chosen, else decoding's defaults."""
        return self.chosen or decoding.default_sampling(self.c.cond_dropout)


def sampling_grid(c):
    """The sampling settings a run's last evaluation chooses among (deploy.py's sampling_grid, on top of
    decoding's defaults), without guidance for a model trained without cond_dropout."""
    grid = decoding.parse_grid(c.sampling_grid, decoding.default_sampling(c.cond_dropout))
    return [s for s in grid if s["cfg"] == 1 or c.cond_dropout > 0]


# -----------------------------------------------------------------------------
# watching a run: metrics.jsonl, loss.png, samples/, index.html

@contextlib.contextmanager
def side_output(what):
    """A file beside the run (metrics, plot, page, samples) that cannot be written (a full disk, a lost
    mount) is a warning, and training goes on; only a checkpoint that cannot be written stops it."""
    try:
        yield
    except (OSError, UserError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e.code if isinstance(e, UserError) else e)
        warnings.warn(f"could not write {what} ({reason.removeprefix('error: ')[:160]}); training goes on", stacklevel=3)


class Monitor:
    """metrics.jsonl, loss.png, index.html, and optional TensorBoard / wandb. Only rank 0 makes one."""

    def __init__(self, out_dir, config, resume_step):
        self.out_dir, self.path = out_dir, os.path.join(out_dir, "metrics.jsonl")
        self.config, self.records, self.plotted = config, [], 0.0
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
        with side_output(f"{self.path} at step {record['step']}"), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wb:
            self.wb.log(scalars, step=record["step"])

    def series(self, key):
        return [(r["step"], r[key]) for r in self.records if key in r]

    def plot(self, every=0):
        """loss.png (unless the last one is younger than `every` seconds; the page is rewritten either way): the losses against the baselines on top; below, how much the model uses its text, and (where
        the run scores samples) the samples' KAD, label adherence, repeats, distinct codes and the model's NLL
        of them, each against the real clips' figure."""
        if time.time() - self.plotted < every:
            return self.page()
        self.plotted = time.time()
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        rows = 4 if self.series("kad") else 2
        fig = plt.figure(figsize=(11, 3.2 * rows + 1))
        grid = fig.add_gridspec(rows, 2, height_ratios=(2, 1, 1, 1)[:rows])
        top = fig.add_subplot(grid[0, :])
        for key, name, style in (("loss", "train", dict()), ("val_loss", "validation", dict(marker="o")),
                                 ("val_loss_shuffled", "validation, labels exchanged", dict(marker=".", alpha=0.6)),
                                 ("val_loss_empty", "validation, empty text", dict(marker=".", alpha=0.6))):
            if self.series(key):
                top.plot(*zip(*self.series(key)), label=name, **style)
        for key, color in (("baseline_unigram", "grey"), ("baseline_bigram", "black")):
            if self.series(key):
                top.axhline(self.series(key)[-1][1], color=color, linestyle="--", linewidth=1, label=key.replace("_", " "))
        top.set_ylabel("cross-entropy (nats)")
        gap = fig.add_subplot(grid[1, 0], sharex=top)
        own = dict(self.series("val_loss"))
        for key, name in (("conditioning_gap", "labels exchanged − own labels"), ("val_loss_empty", "empty text − own labels")):
            points = [(s, v - own[s]) for s, v in self.series(key) if s in own] if key == "val_loss_empty" else self.series(key)
            if points:
                gap.plot(*zip(*points), marker="o", label=name)
        gap.axhline(0, color="black", linewidth=0.8)
        gap.set_ylabel("conditioning gap (nats)")
        axes = [top, gap]
        for (r, col), (key, label, refs) in zip(((1, 1), (2, 0), (2, 1), (3, 0), (3, 1)), SAMPLE_PANELS if rows == 4 else []):
            ax = fig.add_subplot(grid[r, col], sharex=top)
            points = [(s, v) for s, v in self.series(key) if v is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label="samples")
            for (ref, name), color in zip(refs, ("green", "red")):
                series = [(s, v) for s, v in self.series(ref) if v is not None]
                if len(series) == 1:                 # measured once, at the start
                    ax.axhline(series[0][1], color=color, linestyle="--", linewidth=1, label=name)
                elif series:                         # measured with the model, at each evaluation
                    ax.plot(*zip(*series), color=color, linestyle="--", linewidth=1, label=name)
            ax.set_ylabel(label)
            axes.append(ax)
        for ax in axes:
            if ax.get_legend_handles_labels()[1]:
                ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            ax.set_xlabel("step")
        fig.tight_layout()
        with common.atomic_path(os.path.join(self.out_dir, "loss.png"), durable=False) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
        plt.close(fig)
        self.page()

    def page(self, state="running", step=None):
        """index.html as the run is now: running (it reloads itself about as often as a log line comes),
        finished, or stopped (at `step`, the step its checkpoint holds)."""
        with side_output(f"{os.path.join(self.out_dir, 'index.html')}"):
            pace = [r["ms_per_step"] for r in self.records if "ms_per_step" in r][-1:] or [1000]
            refresh = min(300, max(10, round(pace[0] / 1000 * self.config["log_interval"])))
            write_page(self.out_dir, self.records, self.config["max_steps"], state, refresh, step,
                       self.config.get("sample_interval"))


def _json_or_none(line):
    """A metrics line, or None for one that a crash cut off: a side file never blocks a resume."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def clock(seconds):
    """Seconds as h:mm:ss (or m:ss)."""
    h, rest = divmod(int(seconds), 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def write_page(out_dir, records, total=None, state="running", refresh=60, step=None, sample_interval=None):
    """index.html: the run at a glance (where it is, how long it has run and has left, or that it finished or
    stopped, at `step`: the step its checkpoint holds, else the last one logged) and every sample in samples/,
    newest first, each with its player and spectrogram. Built from the files on disk, rewritten atomically;
    relative links, so it works opened from disk or served with `python -m http.server`. While the run goes
    on, the page reloads itself every `refresh` seconds, unless a sample is playing."""
    last = {}
    for r in records:
        last.update(r)
    step = last.get("step", 0) if step is None else step
    elapsed = f" after {clock(last['elapsed_s'])}" if "elapsed_s" in last else ""
    facts = {"running": [f"step {step}" + (f" of {total} ({step / total:.0%})" if total else "")]
             + ([f"{clock(last['elapsed_s'])} elapsed"] if "elapsed_s" in last else [])
             + ([f"about {clock(last['eta_s'])} left"] if last.get("eta_s") is not None and step < (total or 0) else []),
             "finished": [f"finished: {step} steps{elapsed.replace('after', 'in')}"],
             "stopped": [f"stopped at step {step}" + (f" of {total}" if total else "") + f"{elapsed}: continue it with --resume"]}[state]
    numbers = [(name, last[key], ", ".join(f"{REFERENCE_NAMES[r]} {last[r]:.3f}" for r in refs
                                           if isinstance(last.get(r), (int, float))))
               for key, refs, name in MEASURES if isinstance(last.get(key), (int, float))]
    by_step = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(out_dir), "samples", "step*.mp3"))):
        name = os.path.basename(path)
        by_step.setdefault(name[4:10], []).append(name)
    parts = []
    for step in sorted(by_step, reverse=True):
        figures = []
        for name in by_step[step]:
            prompt = name[11:-4].replace("_", " ")
            if os.path.exists(os.path.join(out_dir, "samples", name + ".json")):
                with open(os.path.join(out_dir, "samples", name + ".json")) as f:
                    prompt = json.load(f).get("prompt", prompt) or "(unconditional)"
            picture = (f'<img src="samples/{html.escape(name)}.png" alt="spectrogram">'
                       if os.path.exists(os.path.join(out_dir, "samples", name + ".png")) else "")
            figures.append(f'<figure><figcaption>{html.escape(prompt)}</figcaption>'
                           f'<audio controls preload="none" src="samples/{html.escape(name)}"></audio>{picture}</figure>')
        parts.append(f"<h3>step {int(step)}</h3><div class=row>{''.join(figures)}</div>")
    title = html.escape(os.path.basename(os.path.abspath(out_dir)))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}: {facts[0]}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1400px}} .row{{display:flex;flex-wrap:wrap;gap:1em}}
figure{{margin:0;width:420px}} figcaption{{font-weight:bold;margin-bottom:.3em}} audio,figure img{{width:100%}}</style></head>
<body data-state="{state}"><h1>{title}</h1><p>{' · '.join(facts)} · updated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>
<table>{''.join(f"<tr><td>{html.escape(name)}</td><td><b>{value:.3f}</b></td><td>{html.escape(ref)}</td></tr>" for name, value, ref in numbers)}</table>
{f'<p>samples scored with {html.escape(decoding.describe(last["sampling"]))}</p>' if isinstance(last.get("sampling"), dict) else ""}
{f'<img src="loss.png?step={step}" alt="loss curves" style="max-width:900px;width:100%">' if os.path.exists(os.path.join(out_dir, "loss.png")) else "<p>the curves appear with the first logged steps</p>"}
<details><summary>How to read these numbers</summary><ul>{''.join(f"<li>{html.escape(line)}</li>" for line in READING)}</ul></details>
<h2>Samples</h2>{''.join(parts) or f"<p>{no_samples(state, sample_interval, total)}</p>"}
<script>addEventListener("load", () => {{ document.body.dataset.broken =
  [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length; }});
{RELOAD.replace("SECONDS", str(refresh)) if state == "running" else ""}</script>
</body></html>
"""
    with common.atomic_path(os.path.join(out_dir, "index.html"), durable=False) as tmp, open(tmp, "w") as f:
        f.write(page)


def no_samples(state, interval, total):
    """What the page says where there is no sample yet."""
    if interval == 0:
        return "none: this run writes no samples (sample_interval=0)"
    when = f"every {interval} steps and at the end" if interval else "at its sample interval"
    return {"running": f"none yet: they come {when}", "finished": "none were written",
            "stopped": f"none: the run stopped before its first samples (they come {when}); --resume goes on"}[state]


# the sample panels of loss.png: (key, its axis label, its references: (key, name))
SAMPLE_PANELS = [
    ("kad", "samples' KAD (×1000, lower: closer)", (("kad_real", "real clips"), ("kad_noise", "unigram noise"))),
    ("adherence", "label adherence", (("adherence_real", "real clips"), ("adherence_chance", "chance"))),
    ("repeats", "codes repeating the previous step", (("repeats_real", "real clips"), ("repeats_noise", "unigram noise"))),
    ("distinct_per_s", "distinct codes/s (codebook 0)", (("distinct_per_s_real", "real clips"),
                                                         ("distinct_per_s_noise", "unigram noise"))),
    ("sample_nll", "the model's NLL of the samples", (("nll_real", "real validation clips"),))]
# what the run page shows of the last records: (key, the keys of its references, name)
MEASURES = [("val_loss", ("baseline_unigram", "baseline_bigram"), "validation loss (nats)"),
            ("conditioning_gap", (), "conditioning gap (nats)"), ("fad", ("fad_real", "fad_noise"), "samples' FAD"),
            ("kad", ("kad_real", "kad_noise"), "samples' KAD (× 1000)"),
            ("adherence", ("adherence_real", "adherence_chance"), "label adherence"),
            ("repeats", ("repeats_real", "repeats_noise"), "codes repeating the previous step"),
            ("distinct_per_s", ("distinct_per_s_real", "distinct_per_s_noise"), "distinct codes per second (codebook 0)"),
            ("sample_nll", ("nll_real",), "the model's NLL of its samples (nats)")]
REFERENCE_NAMES = dict(baseline_unigram="unigram", baseline_bigram="bigram", nll_real="real validation clips",
                       **{f"{k}_real": "real clips" for k in ("fad", "kad", "adherence", "repeats", "distinct_per_s")},
                       **{f"{k}_noise": "unigram noise" for k in ("fad", "kad", "repeats", "distinct_per_s")},
                       adherence_chance="chance")
READING = [
    "Validation loss: cross-entropy of the validation clips' codes, in nats (log 1024 = 6.93 is a uniform guess); lower is "
    "better. The baselines are lookup tables fitted on the training clips: a model that does not go below the lowest has "
    "learnt nothing a table could not.",
    "Conditioning gap: the validation loss with each clip's label exchanged for another, minus with its own: how much the "
    "model uses its text. About 0: it ignores the labels; it grows as it learns to follow them.",
    "FAD and KAD: how far the samples (made at each evaluation for the validation clips' labels, with the same seeds every "
    "time) are from the validation clips, in the codec's own latent (no download, no audio decoded): lower is better. Real "
    "training clips score the floor a perfect model reaches at this sample count; codes drawn from the unigram score what no "
    "music scores.",
    "Label adherence: the share of samples that a nearest-centroid classifier (fitted on the training clips' latents) gives "
    "their prompt's label; higher is better. Real validation clips' own share is what the space allows; chance is one over "
    "the number of labels.",
    "Repeats, distinct codes per second and the NLL of the samples: what the sampler does to the music. Samples that repeat "
    "the previous step's code more often than the real clips, use fewer distinct codes, or that the model finds far more "
    "likely than real clips (a much lower NLL), come from a sampler that cuts the distribution too much (top-k, top-p, "
    "temperature below 1, strong guidance): they drift toward loops and drones. Good samples sit near the real clips' "
    "figures on all three.",
    "Sampling: the settings the samples are made with are shown beside them. A run's last evaluation scores several (its "
    "sampling_grid) and keeps the one closest to the real clips (lowest KAD) among those that follow the label about as "
    "well as the best; generate.py and app.py use it unless told otherwise.",
]


# a running run's page reloads itself, from disk as well as served, but never while a sample plays
RELOAD = """(function wait() { setTimeout(() => [...document.querySelectorAll("audio")].some(a => !a.paused) ? wait()
  : location.reload(), SECONDS * 1000); })();"""


def write_samples(model, text_encoder, c, data_info, step, out_dir, device, sampling):
    """A short piece per sample prompt with the run's sampling settings: MP3, spectrogram and prompt in samples/."""
    prompts = data_info["sample_prompts"]
    steps, samples = common.steps_for(c.sample_seconds)
    codes = decoding.sample(model, text_encoder, prompts, steps, device, seed=step, **sampling)
    codec = common.codec_for(data_info, c.codec_weights, device)
    folder = os.path.join(out_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    with torch.no_grad():
        audio = common.decode_codes(codec, codes, data_info["typical_scale"])[..., :samples].cpu()
    for prompt, name, wav in zip(prompts, common.file_names(prompts), audio):
        path = os.path.join(folder, f"step{step:06d}_{name}.mp3")
        common.write_audio(path, wav)
        common.write_spectrogram(path + ".png", wav)
        common.write_json(path + ".json", dict(prompt=prompt, step=step, **sampling))
    print(f"step {step}: {len(prompts)} sample(s) of {c.sample_seconds:g} s in {folder} (step{step:06d}_*.mp3; all of them: "
          f"{os.path.join(out_dir, 'index.html')})")


# -----------------------------------------------------------------------------
# the pieces of the loop

def rng_state(device):
    """This process's random state: the CPU generator, and its GPU's when it has one."""
    return dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.startswith("cuda") else None)


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
        raise UserError(f"cannot build a model of dim={c.dim}, depth={c.depth} on {device} ({common.first_line(e)}): "
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


def optimizer_step(model, raw_model, optimizer, batches, c, step, text_encoder, n_q, device, autocast, world):
    """One optimizer step over grad_accum micro-batches (gradients synchronised once). Returns the mean
    loss per codebook (n_q,), the gradient norm, the number of scored codes and whether the step was
    finite (if not, no update is made)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, c)
    losses, tokens_seen = torch.zeros(n_q, device=device), 0
    for micro in range(c.grad_accum):
        codes, texts = next(batches)
        tokens, targets, text, mask = batch_tensors(codes, texts, text_encoder, c.pattern, raw_model.cfg.vocab, device)
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


# -----------------------------------------------------------------------------

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
    evaluation = Evaluation(data, c, data_info, text_encoder, raw_model.cfg.vocab, device, autocast, monitor, not ckpt,
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
            # a line every log_interval steps, and also after the first step and whenever 30 s passed without one
            if master and (step % c.log_interval == 0 or step == c.max_steps or logged == progress.first
                           or time.time() - t_last >= 30):
                log_progress(monitor, step, step - logged, c, losses, grad_norm, optimizer, tokens_seen * world,
                             time.time() - t_last, device, progress)
                t_last, tokens_seen, logged = time.time(), 0, step
            if step % c.eval_interval == 0 or step == c.max_steps:
                if master:
                    best_val = evaluation(judge, step, best_val, last=step == c.max_steps)
                    save.sampling = evaluation.chosen
                save(step, best_val, "evaluation")
                if master:
                    with side_output(f"loss.png and index.html at step {step}"):
                        monitor.plot()
            if master and c.sample_interval and (step % c.sample_interval == 0 or step == c.max_steps):
                with side_output(f"the samples of step {step}"):
                    write_samples(judge, text_encoder, c, data_info, step, c.out, device, evaluation.sampling)
                monitor.page()
            if stop.requested():
                break
        if step < c.max_steps:                 # stopped (Ctrl-C, SIGTERM): nothing after this run starts (exit status 130)
            save(step, best_val, "stopped by signal")
            if master:
                monitor.page("stopped", step)
            raise (common.stopped(f"the run is saved at step {step} in {save.path}; continue with: {resume_hint}") if master
                   else SystemExit(130))
        if master:
            monitor.page("finished")
            print(f"done: {step} steps, " + (f"best validation loss {best_val:.4f}" if len(data.val_ids) else
                  f"no validation set ({len(data)} clip(s): too few to hold any out)") + f"; checkpoint {save.path}")
        return raw_model
    except Exception as e:
        if world > 1 and lost_a_process(e):     # one line in the project's words instead of gloo's/NCCL's traceback
            raise UserError(f"another process of this run stopped (this is rank {rank} of {world}; torchrun's report names "
                            f"the one that failed), so this one stops too ({common.first_line(e, 100)}). The last checkpoint is "
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


def start_watching(c, config, data, data_info, model, world, device, step, best_val, ckpt):
    """Rank 0's start: what is about to happen, a codec that will be there for the samples, the baselines."""
    announce(c, data, model, world, device, step, best_val, c.init_from and not ckpt)
    if c.sample_interval or c.quality_samples:
        common.codec_for(data_info, c.codec_weights, "cpu")   # fail now, not hours in, if the codec is missing
    monitor = Monitor(c.out, config, step if ckpt else None)
    if not ckpt:
        found = baselines(data, c, model.cfg.vocab)
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
    left = f", {clock(record['eta_s'])} left" if record["eta_s"] is not None and step < c.max_steps else ""
    print(f"step {step}/{c.max_steps} ({step / c.max_steps:.0%}): loss {record['loss']:.4f} "
          f"({' '.join(f'{x:.3f}' for x in record['loss_per_codebook'])}) lr {record['lr']:.2e} |g| {record['grad_norm']:.3f} "
          f"{record['tokens_per_s']:.0f} tok/s {record['ms_per_step']:.0f} ms/step {peak:.2f} GiB · "
          f"{clock(record['elapsed_s'])} elapsed{left}", flush=True)
    with side_output(f"loss.png at step {step}"):
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
