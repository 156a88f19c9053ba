"""
Watching a run: the files in its folder that say how it goes, written by rank 0 as it trains.
metrics.jsonl (every logged number), loss.png (the curves against their references), samples/ (a short
piece per sample prompt now and then, with a spectrogram) and index.html (all of it in a browser, with a
player per sample, reloading itself while the run goes on). Optional TensorBoard / wandb. A file here
that cannot be written is a warning: only a checkpoint that cannot be written stops a run.
"""
import contextlib
import glob
import html
import json
import os
import time
import warnings

import torch

import audio
import codec
import common
import decoding
from settings import UserError

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
    steps, samples = codec.steps_for(c.sample_seconds)
    codes = decoding.sample(model, text_encoder, prompts, steps, device, seed=step, **sampling)
    encodec = codec.codec_for(data_info, c.codec_weights, device)
    folder = os.path.join(out_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    with torch.no_grad():
        wavs = codec.decode_codes(encodec, codes, data_info["typical_scale"])[..., :samples].cpu()
    for prompt, name, wav in zip(prompts, common.file_names(prompts), wavs):
        path = os.path.join(folder, f"step{step:06d}_{name}.mp3")
        audio.write_audio(path, wav)
        audio.write_spectrogram(path + ".png", wav)
        common.write_json(path + ".json", dict(prompt=prompt, step=step, **sampling))
    print(f"step {step}: {len(prompts)} sample(s) of {c.sample_seconds:g} s in {folder} (step{step:06d}_*.mp3; all of them: "
          f"{os.path.join(out_dir, 'index.html')})")


