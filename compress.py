"""
Turn a folder of audio and text labels into Encodec 48 kHz tokens stored in .h5 shards.

    python compress.py --input=music/ --output=data/
    python compress.py --input=music/ --output=data/ --codec=untrained     # offline demo codec
    torchrun --nproc_per_node=4 compress.py --input=music/ --output=data/  # one shard series per GPU

Labels come from metadata.csv (columns file,text) or metadata.jsonl ({"file": ..., "text": ...}) in the
input folder, else from a sidecar per audio file: name.txt (the text) or name.json (audiocraft style:
"description", else "genre", "moods", "keywords", "instrument" joined). Rerunning resumes: files already
in finished shards are skipped. The shard layout is documented in README.md.
"""
import csv
import glob
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter

import h5py
import numpy as np
import torch
from tqdm import tqdm

import common
from common import SAMPLE_RATE, SEGMENT_STEPS, SEGMENT_STRIDE, UserError

# -----------------------------------------------------------------------------
# settings: edit here, or override on the command line as --name=value
input = ""              # folder of audio files (searched recursively) and their labels
output = ""             # folder for the .h5 shards; rerunning into it resumes
clip_seconds = 30       # cut files into clips of this many codec segments (~1 s each, 150 steps)
min_seconds = 5         # a final remainder shorter than this is dropped (longer ones keep their length)
codec = "pretrained"    # pretrained: official Encodec 48 kHz; untrained: seeded random codec for offline tests and demos
codec_weights = ""      # path of a local encodec_48khz-7e698e3e.th, for machines that cannot download it
codec_seed = 0          # seed of the untrained codec
bandwidth = 6.0         # kbps: 3.0, 6.0 (4 codebooks, the default), 12.0 or 24.0
batch_size = 16         # clips per codec call
num_workers = 4         # processes that read and resample audio (0: in this process)
shard_clips = 2000      # start a new shard after this many clips (shards end at file boundaries)
device = "auto"         # auto (cuda when available), cpu, cuda
# -----------------------------------------------------------------------------
FORMAT_VERSION = 1
SILENCE_RMS = 1e-4      # clips quieter than -80 dBFS carry no music


# -----------------------------------------------------------------------------
# labels

def _sidecar_text(audio_path):
    base = os.path.splitext(audio_path)[0]
    if os.path.exists(base + ".txt"):
        with open(base + ".txt", encoding="utf-8") as f:
            return f.read().strip()
    if os.path.exists(base + ".json"):
        with open(base + ".json", encoding="utf-8") as f:
            meta = json.load(f)
        if str(meta.get("description") or "").strip():
            return str(meta["description"]).strip()
        parts = []
        for key in ("genre", "moods", "keywords", "instrument"):
            value = meta.get(key)
            parts += value if isinstance(value, list) else [value] if value else []
        return ", ".join(str(p).strip() for p in parts if str(p).strip()) or None
    return None


def load_labels(root, files):
    """{relative path: text or None} from metadata.csv / metadata.jsonl, else per-file sidecars."""
    table = {}
    csv_path, jsonl_path = os.path.join(root, "metadata.csv"), os.path.join(root, "metadata.jsonl")
    if os.path.exists(csv_path):
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not {"file", "text"} <= set(reader.fieldnames or []):
                raise UserError(f"{csv_path} needs a header row with columns file,text (found {reader.fieldnames})")
            for row in reader:
                table[os.path.normpath(row["file"])] = (row["text"] or "").strip()
    elif os.path.exists(jsonl_path):
        with open(jsonl_path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    table[os.path.normpath(row["file"])] = str(row["text"]).strip()
                except (ValueError, KeyError, TypeError):
                    raise UserError(f'{jsonl_path} line {n} is not {{"file": ..., "text": ...}}') from None
    labels = {}
    for rel in files:
        text = table.get(os.path.normpath(rel))
        labels[rel] = text if text is not None else _sidecar_text(os.path.join(root, rel))
    return labels


# -----------------------------------------------------------------------------
# reading audio (runs in worker processes)

def _init_worker():
    torch.set_num_threads(1)


def load_clips(job):
    """Read one file and cut it into clips. Returns a dict with the clips [(start_seconds, (2, samples))],
    or a skip reason. Clips hold whole codec segments: `clip_seconds` of them, or fewer for a remainder."""
    path, rel, clip_segments, min_secs = job
    result = dict(rel=rel, clips=[], reason=None, detail="", dropped_seconds=0.0, silent_clips=0)
    if os.path.getsize(path) == 0:
        return dict(result, reason="empty file")
    try:
        audio, sr = common.read_audio(path)
    except Exception as e:
        return dict(result, reason="unreadable", detail=str(e).splitlines()[0][:120] if str(e) else type(e).__name__)
    if audio.size == 0:
        return dict(result, reason="empty file", detail="no samples")
    if not np.isfinite(audio).all():
        return dict(result, reason="unreadable", detail="contains NaN or infinite samples")
    wav = common.to_stereo_48k(audio, sr)
    n = wav.shape[1]
    full, hop = common.clip_samples(clip_segments), clip_segments * SEGMENT_STRIDE
    start = 0
    while start + full <= n:
        result["clips"].append((start / SAMPLE_RATE, wav[:, start:start + full]))
        start += hop
    remainder = n - start
    if remainder >= max(min_secs * SAMPLE_RATE, SAMPLE_RATE):
        segments = common.whole_segments(remainder)
        result["clips"].append((start / SAMPLE_RATE, wav[:, start:start + common.clip_samples(segments)]))
    elif remainder > SAMPLE_RATE - SEGMENT_STRIDE:  # beyond the overlap the last clip already covers
        result["dropped_seconds"] = remainder / SAMPLE_RATE
    loud = [c for c in result["clips"] if c[1].pow(2).mean().sqrt() >= SILENCE_RMS]
    result["silent_clips"] = len(result["clips"]) - len(loud)
    result["clips"] = [(s, c.numpy()) for s, c in loud]
    if not loud:
        if result["silent_clips"]:
            return dict(result, reason="silent")
        return dict(result, reason="too short", detail=f"{n / SAMPLE_RATE:.1f} s < min_seconds={min_secs}")
    return result


# -----------------------------------------------------------------------------
# writing shards

class ShardWriter:
    """Collects encoded clips and writes them as shard-r{rank}-{index}.h5, via a temporary file and a
    rename, so a shard on disk is always complete. Shards end at file boundaries."""

    def __init__(self, out_dir, rank, clip_steps, clip_segments, attrs):
        self.out_dir, self.rank, self.attrs = out_dir, rank, attrs
        self.clip_steps, self.clip_segments = clip_steps, clip_segments
        self.rows = []
        self.index = len(glob.glob(os.path.join(out_dir, f"shard-r{rank:03d}-*.h5")))

    def add(self, codes, scales, text, source):
        self.rows.append((codes, scales, text, source))

    def __len__(self):
        return len(self.rows)

    def flush(self):
        if not self.rows:
            return
        n, n_q = len(self.rows), self.rows[0][0].shape[0]
        codes = np.zeros((n, n_q, self.clip_steps), np.int16)
        scales = np.zeros((n, self.clip_segments), np.float32)
        lengths = np.zeros(n, np.int32)
        for i, (c, s, _, _) in enumerate(self.rows):
            codes[i, :, :c.shape[1]], scales[i, :len(s)], lengths[i] = c, s, c.shape[1]
        path = os.path.join(self.out_dir, f"shard-r{self.rank:03d}-{self.index:05d}.h5")
        strings = h5py.string_dtype("utf-8")
        with common.atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("codes", data=codes, chunks=(1, n_q, self.clip_steps), compression="gzip", compression_opts=4)
                f.create_dataset("lengths", data=lengths)
                f.create_dataset("scales", data=scales)
                f.create_dataset("text", data=[r[2] for r in self.rows], dtype=strings)
                f.create_dataset("source", data=[r[3] for r in self.rows], dtype=strings)
                f.attrs.update(self.attrs)
        self.rows, self.index = [], self.index + 1


def finished_shards(out_dir):
    return sorted(glob.glob(os.path.join(out_dir, "shard-*.h5")))


def encoded_files(shards, attrs):
    """Relative paths of the files already in finished shards; refuses shards made with other settings."""
    done = set()
    for path in shards:
        try:
            with h5py.File(path, "r") as f:
                for key in ("codec", "bandwidth", "clip_seconds", "n_q"):
                    if f.attrs[key] != attrs[key]:
                        raise UserError(f"{path} was made with {key}={f.attrs[key]}, not {attrs[key]}: "
                                        "use another --output folder or the same settings")
                done.update(s.decode().rsplit("@", 1)[0] for s in f["source"][:])
        except OSError as e:
            raise UserError(f"{path} is not a readable shard ({e}); delete it and rerun") from None
    return done


# -----------------------------------------------------------------------------

def encode_group(codec, dev, group, batch):
    """Encode the clips of several files, `batch` clips of equal length per codec call.
    Returns, per file, a list of (codes int16 (n_q, T), scales float32 (S,)) in clip order."""
    jobs = [(fi, ci, clip) for fi, r in enumerate(group) for ci, (_, clip) in enumerate(r["clips"])]
    out = [[None] * len(r["clips"]) for r in group]
    for length in sorted({j[2].shape[1] for j in jobs}):
        same = [j for j in jobs if j[2].shape[1] == length]
        for i in range(0, len(same), batch):
            chunk = same[i:i + batch]
            wav = torch.from_numpy(np.stack([j[2] for j in chunk])).to(dev, non_blocking=True)
            with torch.inference_mode():
                codes, scales = common.encode_clips(codec, wav)
            codes, scales = codes.to(torch.int16).cpu().numpy(), scales.float().cpu().numpy()
            for k, (fi, ci, _) in enumerate(chunk):
                out[fi][ci] = (codes[k], scales[k])
    return out


def main(argv):
    cfg = common.parse_settings(common.settings(globals()), argv)
    if not cfg["input"] or not os.path.isdir(cfg["input"]):
        raise UserError(f"--input={cfg['input']!r} is not a folder: give the folder that holds your audio files")
    if not cfg["output"]:
        raise UserError("--output is missing: give a folder for the .h5 shards, e.g. --output=data/")
    if cfg["clip_seconds"] < 1 or not 0 <= cfg["min_seconds"] <= cfg["clip_seconds"]:
        raise UserError("need clip_seconds >= 1 and 0 <= min_seconds <= clip_seconds")
    if cfg["bandwidth"] not in (3.0, 6.0, 12.0, 24.0):
        raise UserError(f"bandwidth={cfg['bandwidth']} is not one of Encodec 48 kHz's: 3.0, 6.0, 12.0, 24.0")
    rank, local_rank, world = common.distributed_env()
    dev = common.pick_device(cfg["device"])
    if dev == "cuda" and world > 1:
        dev = f"cuda:{local_rank}"
    root, out_dir = os.path.abspath(cfg["input"]), os.path.abspath(cfg["output"])
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, f"shard-r{rank:03d}-*.h5.tmp*")):
        os.remove(stale)  # left by an interrupted run: never a finished shard

    n_q = int(cfg["bandwidth"] * 1000 // (common.FRAME_RATE * 10))
    attrs = dict(format_version=FORMAT_VERSION, sample_rate=SAMPLE_RATE, frame_rate=common.FRAME_RATE, n_q=n_q,
                 bandwidth=float(cfg["bandwidth"]), codec=common.codec_name(cfg["codec"], cfg["codec_seed"]),
                 clip_seconds=int(cfg["clip_seconds"]), segment_steps=SEGMENT_STEPS,
                 segment_stride_samples=SEGMENT_STRIDE)
    files = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                   if p.lower().endswith(common.AUDIO_EXTENSIONS) and os.path.isfile(p)
                   and not os.path.abspath(p).startswith(out_dir + os.sep))
    if not files:
        raise UserError(f"no audio files ({', '.join(common.AUDIO_EXTENSIONS)}) found under {root}")
    done = encoded_files(finished_shards(out_dir), attrs)
    todo = [f for f in files[rank::world] if f not in done]   # split first: shares never depend on timing
    if done:
        print(f"resuming: {len(done)} files already in shards in {out_dir}; {len(todo)} to go on this rank")
    if not todo:
        print("nothing to do: every file is already encoded")
        return 0
    labels = load_labels(root, todo)

    codec_model = common.load_codec(cfg["codec"], cfg["codec_weights"], cfg["codec_seed"], cfg["bandwidth"], dev)
    if cfg["codec"] == "untrained":
        print(f"NOTE: codec=untrained ({attrs['codec']}): random Encodec weights, for tests and demos only. "
              "Tokens are not those of the real codec, and audio decoded from them will not sound like music.")
    writer = ShardWriter(out_dir, rank, cfg["clip_seconds"] * SEGMENT_STEPS, cfg["clip_seconds"], attrs)
    stats, skipped, unlabeled = Counter(), Counter(), 0
    jobs = [(os.path.join(root, rel), rel, cfg["clip_seconds"], cfg["min_seconds"]) for rel in todo]
    pool = mp.get_context("spawn").Pool(cfg["num_workers"], initializer=_init_worker) if cfg["num_workers"] > 0 else None
    results = pool.imap(load_clips, jobs) if pool else map(load_clips, jobs)
    t0, group = time.time(), []
    bar = tqdm(total=len(jobs), unit="file", dynamic_ncols=True, disable=rank != 0)

    def finish(group):
        nonlocal unlabeled
        for r, encoded in zip(group, encode_group(codec_model, dev, group, cfg["batch_size"])):
            text = labels[r["rel"]]
            unlabeled += text is None
            for (start, _), (codes, scales) in zip(r["clips"], encoded):
                writer.add(codes, scales, text or "", f"{r['rel']}@{start:.2f}")
                stats["clips"] += 1
                stats["steps"] += codes.shape[1]
            stats["files"] += 1
            if len(writer) >= cfg["shard_clips"]:
                writer.flush()

    try:
        for r in results:
            bar.update(1)
            stats["dropped_remainders"] += r["dropped_seconds"] > 0
            stats["silent_clips"] += r["silent_clips"]
            if r["reason"]:
                skipped[r["reason"]] += 1
                tqdm.write(f"skip {r['rel']}: {r['reason']}{' (' + r['detail'] + ')' if r['detail'] else ''}")
                continue
            group.append(r)
            if sum(len(g["clips"]) for g in group) >= cfg["batch_size"]:
                finish(group)
                group = []
            dt = time.time() - t0
            bar.set_postfix_str(f"{stats['clips'] / dt:.1f} clips/s, {stats['steps'] / common.FRAME_RATE / 3600 / dt:.3f} audio-h/s")
        finish(group)
        writer.flush()
    finally:
        bar.close()
        if pool:
            pool.terminate()

    hours = stats["steps"] / common.FRAME_RATE / 3600
    print(f"done in {time.time() - t0:.0f} s: {stats['files']} files → {stats['clips']} clips, {hours:.2f} h of audio "
          f"(codec {attrs['codec']}), shards in {out_dir}")
    print(f"skipped files: {sum(skipped.values())}" + "".join(f", {k}: {v}" for k, v in sorted(skipped.items())))
    print(f"dropped: {stats['dropped_remainders']} remainders shorter than min_seconds={cfg['min_seconds']}, "
          f"{stats['silent_clips']} silent clips; unlabeled files (empty text): {unlabeled}")
    if stats["clips"] == 0 and not done:
        print("error: nothing could be encoded (see the skipped files above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
