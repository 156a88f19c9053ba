"""
Turn a folder of audio and text labels into Encodec 48 kHz tokens stored in .h5 shards.

    python compress.py --input=music/ --output=data/
    python compress.py --input=music/ --output=data/ --codec=untrained     # offline demo codec
    torchrun --nproc_per_node=4 compress.py --input=music/ --output=data/  # one shard series per GPU

Labels come from metadata.csv (columns file,text) or metadata.jsonl ({"file": ..., "text": ...}) in the
input folder, else from a sidecar per audio file: name.txt (the text) or name.json (audiocraft style:
"description", else "genre", "moods", "keywords", "instrument" joined). Rerunning resumes: files already
in finished shards (same path, size and modification time) are skipped. The shard layout is documented
in README.md.
"""
import csv
import glob
import hashlib
import io
import itertools
import json
import multiprocessing as mp
import os
import queue
import signal
import stat
import subprocess
import sys
import time
from collections import Counter

import settings  # first: Ctrl-C while the libraries below load then ends in one line, not a traceback
import h5py
import numpy as np
import torch
from tqdm import tqdm

import audio
import common
from codec import FRAME_RATE, SAMPLE_RATE, SEGMENT_STEPS, SEGMENT_STRIDE, clip_samples, codec_name, decode_codes, encode_clips, load_codec, whole_segments
from settings import UserError

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
encode = "auto"         # auto (batched on a GPU, the package's loop on a CPU: measured faster there), loop, batched
check_codec = 8         # encode and decode this many clips spread over the data, into OUTPUT/codec_check/ (0: off)
device = "auto"         # auto (cuda when available), cpu, cuda
# -----------------------------------------------------------------------------
FORMAT_VERSION = 3      # 2: per-clip file_size and file_mtime_ns, so resuming knows a file by more than its name;
                        # 3: per-clip file_sha1, so a renamed or moved file is known by its bytes
SILENCE_RMS = 1e-4      # clips quieter than -80 dBFS carry no music
PIECE_CLIPS = 4         # a reader hands over a long file this many clips at a time (memory: a few clips)
SHOW = 5                # names listed per problem in the summary


# -----------------------------------------------------------------------------
# labels

def label_text(value):
    """A label from metadata: null → empty, a list → its items joined with commas, else the text."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v).strip() for v in value if v is not None and str(v).strip())
    return str(value).strip()


def read_text(path):
    """A text file a person wrote: UTF-8 (with or without a byte-order mark), else Windows-1252, which is
    what Excel on Windows saves as plain "CSV" (said once per file); anything else stops with one line."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        text = raw.decode("cp1252")
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:
        raise UserError(f"{path} is not text (neither UTF-8 nor Windows-1252): save it as CSV UTF-8 or plain text")
    print(f"NOTE: {path} is not UTF-8; it was read as Windows-1252 (Excel's plain CSV): check that accented labels "
          "look right, or save it as CSV UTF-8")
    return text


def _sidecar_text(audio_path):
    base = os.path.splitext(audio_path)[0]
    if os.path.exists(base + ".txt"):
        return read_text(base + ".txt").strip()
    if os.path.exists(base + ".json"):
        try:
            meta = json.loads(read_text(base + ".json"))
        except ValueError as e:
            raise UserError(f"{base}.json is not valid JSON ({e}): fix it or remove it") from None
        if not isinstance(meta, dict):
            return None
        if label_text(meta.get("description")):
            return label_text(meta["description"])
        parts = [label_text(meta.get(key)) for key in ("genre", "moods", "keywords", "instrument")]
        return ", ".join(p for p in parts if p) or None
    return None


def _table_key(path):
    """metadata paths written on Windows use backslashes: both separators mean the same file."""
    return os.path.normpath(path.replace("\\", "/"))


def read_metadata(root):
    """({path as written: text}, [(path, earlier text, kept text)] for paths listed twice with different
    texts: the last row wins) from metadata.csv or metadata.jsonl, or (None, [])."""
    csv_path, jsonl_path = os.path.join(root, "metadata.csv"), os.path.join(root, "metadata.jsonl")
    rows = []
    if os.path.exists(csv_path):
        reader = csv.DictReader(io.StringIO(read_text(csv_path), newline=""))
        if not {"file", "text"} <= set(reader.fieldnames or []):
            raise UserError(f"{csv_path} needs a header row with columns file,text (found {reader.fieldnames})")
        rows = [(row["file"] or "", label_text(row["text"])) for row in reader]
    elif os.path.exists(jsonl_path):
        for n, line in enumerate(read_text(jsonl_path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append((str(row["file"]), label_text(row.get("text"))))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise UserError(f'{jsonl_path} line {n} is not {{"file": ..., "text": ...}}') from None
    else:
        return None, []
    table, twice = {}, []
    for path, text in rows:
        if path in table and table[path] != text:
            twice.append((path, table[path], text))
        table[path] = text
    return table, twice


def load_labels(root, files):
    """{relative path: text, or None when a file has no label}, the metadata rows that name no file, and
    the paths metadata lists twice with different texts (read_metadata). A row matches a file by its path
    with either separator, then by the same path in other letter case."""
    table, twice = read_metadata(root)
    table = table or {}
    exact = {_table_key(rel): rel for rel in files}
    folded = {}
    for rel in files:
        folded.setdefault(_table_key(rel).lower(), []).append(rel)
    labels, orphans = {}, []
    for written, text in table.items():
        key = _table_key(written)
        match = exact.get(key) or (folded[key.lower()][0] if len(folded.get(key.lower(), [])) == 1 else None)
        if match is None:
            orphans.append(written)
        elif match not in labels or key in exact:
            labels[match] = text
    for rel in files:
        if rel not in labels:
            labels[rel] = _sidecar_text(os.path.join(root, rel))
    return labels, orphans, twice


# -----------------------------------------------------------------------------
# reading audio (in worker processes): a file becomes pieces of a few clips each, then a summary

def file_pieces(path, rel, clip_segments, min_secs):
    """Yield dicts for one file: pieces {clips: [(start_seconds, (2, samples) float32)]}, the last one with
    last=True and the file's summary (or a skip reason, which voids the pieces before it). Clips hold whole
    codec segments: `clip_segments` of them, or fewer for a remainder. A clip louder than full scale is
    scaled down to peak 1.0 rather than clipped."""
    summary = dict(rel=rel, last=True, clips=[], reason=None, detail="", seconds=0.0, dropped_seconds=0.0,
                   silent_clips=0, loud_clips=0, peak=0.0)
    if os.path.getsize(path) == 0:
        yield dict(summary, reason="empty file")
        return
    summary["sha1"] = file_hash(path)     # how the file is known again after a rename
    full, hop = clip_samples(clip_segments), clip_segments * SEGMENT_STRIDE
    clips, buf, buf_start, start, n, kept = [], torch.zeros(2, 0), 0, 0, 0, 0

    def add(clip):
        nonlocal kept
        if clip.pow(2).mean().sqrt() < SILENCE_RMS:
            summary["silent_clips"] += 1
            return
        peak = float(clip.abs().max())
        if peak > 1.0:
            clip = clip / peak
            summary["loud_clips"] += 1
            summary["peak"] = max(summary["peak"], peak)
        clips.append((start / SAMPLE_RATE, clip.numpy()))
        kept += 1

    try:
        for block in audio.stream_48k(path):
            if not torch.isfinite(block).all():
                yield dict(summary, reason="unreadable", detail="contains NaN or infinite samples")
                return
            buf, n = torch.cat([buf, block], 1), n + block.shape[1]
            while start + full <= n:
                add(buf[:, start - buf_start:start - buf_start + full].clone())
                start += hop
                buf, buf_start = buf[:, start - buf_start:], start
                if len(clips) >= PIECE_CLIPS:
                    yield dict(rel=rel, last=False, clips=clips)
                    clips = []
    except Exception as e:
        yield dict(summary, reason="unreadable", detail=settings.first_line(e))
        return
    if n == 0:
        yield dict(summary, reason="empty file", detail="no samples")
        return
    remainder = n - start
    if remainder >= max(min_secs * SAMPLE_RATE, SAMPLE_RATE):
        add(buf[:, start - buf_start:start - buf_start + clip_samples(whole_segments(remainder))].clone())
    elif remainder >= SAMPLE_RATE:  # a shorter tail holds no whole codec segment: nothing a clip could have kept
        summary["dropped_seconds"] = remainder / SAMPLE_RATE
    summary.update(clips=clips, seconds=n / SAMPLE_RATE)
    if kept == 0:
        if summary["silent_clips"]:
            summary["reason"] = "silent"
        else:
            summary.update(reason="too short", detail=f"{n / SAMPLE_RATE:.1f} s < min_seconds={min_secs}")
    yield summary


def _reader(jobs, out):
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is the main process's to handle; it ends the readers
    torch.set_num_threads(1)
    for job in jobs:
        for piece in file_pieces(*job):
            out.put(piece)


def read_in_order(jobs, num_workers):
    """The pieces of every job's file, in job order whatever the number of workers. Worker w reads jobs
    w, w + W, ... into its own small queue, so memory stays bounded by a few pieces per worker."""
    if num_workers == 0:
        for job in jobs:
            yield from file_pieces(*job)
        return
    ctx = mp.get_context("spawn")
    queues = [ctx.Queue(maxsize=2) for _ in range(num_workers)]
    procs = [ctx.Process(target=_reader, args=(jobs[w::num_workers], queues[w]), daemon=True) for w in range(num_workers)]
    for p in procs:
        p.start()
    try:
        for i, job in enumerate(jobs):
            w = i % num_workers
            while True:
                try:
                    piece = queues[w].get(timeout=1.0)
                except queue.Empty:
                    if procs[w].exitcode is not None:
                        raise UserError(f"the process reading {job[1]} died (exit code {procs[w].exitcode}: a crash in the "
                                        "audio decoder). Move that file out of --input and rerun; finished shards are kept") from None
                    continue
                yield piece
                if piece["last"]:
                    if i + num_workers >= len(jobs):
                        procs[w].join(timeout=10)     # its last file: it ends, and is not left a zombie while we encode
                    break
    finally:
        for p in procs:
            p.terminate()


# -----------------------------------------------------------------------------
# writing shards

def shard_path(out_dir, rank, index):
    return os.path.join(out_dir, f"shard-r{rank:03d}-{index:05d}.h5")


class ShardWriter:
    """Collects encoded clips and writes them as shard-r{rank}-{index}.h5. A shard is built in memory,
    written to a temporary file and then given the first free index: a name is claimed atomically, so
    concurrent runs into one folder never overwrite each other's shards, and a shard on disk is always
    complete. Shards end at file boundaries."""

    def __init__(self, out_dir, rank, clip_steps, clip_segments, attrs):
        self.out_dir, self.rank, self.attrs = out_dir, rank, attrs
        self.clip_steps, self.clip_segments = clip_steps, clip_segments
        self.rows = []
        self.index = len(glob.glob(os.path.join(glob.escape(out_dir), f"shard-r{rank:03d}-*.h5")))

    def add(self, rows):
        """rows: one file's clips, each (codes, scales, text, source, identity: (size in bytes, modification
        time in ns) of the file, its sha1). Added in one step, so a shard never holds part of a file."""
        self.rows.extend(rows)

    def __len__(self):
        return len(self.rows)

    def flush(self):
        """Write the rows added so far as a shard; returns {source file: [[shard name, row], ...]} of what it holds."""
        rows, self.rows = self.rows, []     # an interrupted write loses them from memory only: never a shard twice
        if not rows:
            return {}
        n, n_q = len(rows), rows[0][0].shape[0]
        codes = np.zeros((n, n_q, self.clip_steps), np.int16)
        scales = np.zeros((n, self.clip_segments), np.float32)
        lengths = np.zeros(n, np.int32)
        for i, (c, s, *_) in enumerate(rows):
            codes[i, :, :c.shape[1]], scales[i, :len(s)], lengths[i] = c, s, c.shape[1]
        strings = h5py.string_dtype("utf-8")
        buffer = io.BytesIO()     # built in memory: a full disk then fails in Python, with a clear message
        with h5py.File(buffer, "w") as f:
            f.create_dataset("codes", data=codes, chunks=(1, n_q, self.clip_steps), compression="gzip", compression_opts=4)
            f.create_dataset("lengths", data=lengths)
            f.create_dataset("scales", data=scales)
            f.create_dataset("text", data=[r[2] for r in rows], dtype=strings)
            f.create_dataset("source", data=[r[3] for r in rows], dtype=strings)
            f.create_dataset("file_size", data=np.array([r[4][0] for r in rows], np.int64))
            f.create_dataset("file_mtime_ns", data=np.array([r[4][1] for r in rows], np.int64))
            f.create_dataset("file_sha1", data=[r[5] for r in rows], dtype=strings)
            f.attrs.update(self.attrs)
        tmp = f"{shard_path(self.out_dir, self.rank, self.index)}.tmp{os.getpid()}"
        intact = "the shards finished before it are intact: free some space and rerun the same command to resume"
        try:
            with common.disk_errors(tmp, intact):
                with open(tmp, "wb") as f:
                    f.write(buffer.getbuffer())
                    f.flush()
                    os.fsync(f.fileno())
                path = common.publish_new(tmp, (shard_path(self.out_dir, self.rank, i) for i in itertools.count(self.index)))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self.index = int(path[-8:-3]) + 1
        held = {}
        for row, r in enumerate(rows):
            held.setdefault(r[3].rsplit("@", 1)[0], []).append([os.path.basename(path), row])
        return held


def finished_shards(out_dir):
    return sorted(glob.glob(os.path.join(glob.escape(out_dir), "shard-*.h5")))


def file_identity(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def file_hash(path):
    """The sha1 of a file's bytes: how a file is known again after a rename or a move."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def encoded_clips(shards, attrs):
    """What the finished shards hold, by the file each clip came from: {(relative path, size, mtime_ns):
    {"sha1", "text", "clips": [[shard name, row], ...]}} (size, mtime and sha1 None where a shard of an
    older format did not store them). Refuses shards made with other settings."""
    held = {}
    for path in shards:
        try:
            with h5py.File(path, "r") as f:
                for key in ("codec", "bandwidth", "clip_seconds", "n_q"):
                    if f.attrs[key] != attrs[key]:
                        raise UserError(f"{path} was made with {key}={f.attrs[key]}, not {attrs[key]}: "
                                        "use another --output folder or the same settings")
                n = len(f["source"])
                column = lambda name: f[name][:].tolist() if name in f else [None] * n
                sources = [s.decode().rsplit("@", 1)[0] for s in f["source"][:]]
                texts = [t.decode() for t in f["text"][:]]
                hashes = [h.decode() if h is not None else None for h in column("file_sha1")]
                for row, (rel, size, mtime, sha1, text) in enumerate(zip(sources, column("file_size"), column("file_mtime_ns"),
                                                                        hashes, texts)):
                    entry = held.setdefault((rel, size, mtime), dict(sha1=sha1, text=text, clips=[], shard=path))
                    if entry["shard"] == path:        # a file encoded twice (by two runs at once): one copy
                        entry["clips"].append([os.path.basename(path), row])
        except OSError as e:
            raise UserError(f"{path} is damaged or incomplete ({str(e).strip()[:100]}): move it out of {os.path.dirname(path)} "
                            "and rerun (what it held is encoded again)") from None
    return held


# -----------------------------------------------------------------------------

def encode_batch(encodec, clips, dev, batched, progress=None):
    """Encode (2, samples) float32 arrays (see encode_clips, which calls progress as it goes; on a GPU
    through pinned memory). Returns, in order, (codes int16 (n_q, 150·S), scales float32 (S,))."""
    wavs = [torch.from_numpy(c) for c in clips]
    if dev.startswith("cuda"):
        wavs = [w.pin_memory().to(dev, non_blocking=True) for w in wavs]
    with torch.inference_mode():
        encoded = encode_clips(encodec, wavs, batched, progress=progress)
    return [(codes.to(torch.int16).cpu().numpy(), scales.float().cpu().numpy()) for codes, scales in encoded]


def check_round_trip(encodec, wav, codes, scales, dev, rel, out_dir, n):
    """Decode one encoded clip, write it and the original as MP3 into out_dir/codec_check/, and return
    (rel, signal-to-noise ratio of the round trip in dB, the decoded file's name)."""
    original = torch.from_numpy(wav)
    with torch.inference_mode():
        decoded = decode_codes(encodec, torch.from_numpy(codes).long()[None].to(dev),
                                      torch.from_numpy(scales)[None].to(dev))[0].float().cpu()
    noise = (original - decoded).pow(2).sum()
    snr = float(10 * torch.log10(original.pow(2).sum() / noise.clamp_min(1e-20)))
    folder = os.path.join(out_dir, "codec_check")
    os.makedirs(folder, exist_ok=True)
    name = os.path.join(folder, f"{n:02d}_{common.slug(os.path.splitext(rel)[0])}")
    audio.write_audio(f"{name}.original.mp3", original, overwrite=False)
    return rel, snr, audio.write_audio(f"{name}.codec.mp3", decoded, overwrite=False)


def report_codec_check(checks, out_dir, codec_name):
    """One line per checked clip and a summary that names the clips the codec handles poorly."""
    folder = os.path.join(out_dir, "codec_check")
    snrs = sorted(snr for _, snr, _ in checks)
    median = snrs[len(snrs) // 2]
    poor = [(rel, snr) for rel, snr, _ in checks if snr < median - 6.0]
    lines = [f"{snr:6.1f} dB  {rel}  → {os.path.basename(path)}" for rel, snr, path in checks]
    summary = (f"codec check: {len(checks)} clips encoded and decoded into {folder}: signal-to-noise median {median:.1f} dB, "
               f"worst {snrs[0]:.1f} dB" + (f"; poor round trips (6 dB or more below the median): "
                                            f"{', '.join(f'{r} ({s:.1f} dB)' for r, s in poor)}" if poor else ""))
    if codec_name.startswith("untrained"):
        summary += ". The untrained codec is random: these numbers mean nothing about the real codec"
    common.write_json(os.path.join(folder, "summary.json"), dict(codec=codec_name, median_snr_db=median, summary=summary,
                                                                 clips=[dict(file=r, snr_db=s, decoded=p) for r, s, p in checks]))
    print("\n".join(["codec check (listen: *.original.mp3 against *.codec.mp3):", *lines, summary]))


def durations(paths):
    """Each file's length in seconds for the progress bar (0 where its header does not say), read by a few
    threads: for files only ffmpeg reads, that is one short ffmpeg process each."""
    from concurrent.futures import ThreadPoolExecutor

    def seconds(path):
        try:
            return audio.audio_seconds(path) or 0.0
        except (ValueError, OSError, subprocess.SubprocessError):
            return 0.0
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(seconds, paths))


def names(items):
    items = list(items)
    return ", ".join(items[:SHOW]) + (f", ... ({len(items) - SHOW} more)" if len(items) > SHOW else "")


def validate(cfg):
    if not cfg["input"] or not os.path.isdir(cfg["input"]):
        raise UserError(f"--input={cfg['input']!r} is not a folder: give the folder that holds your audio files")
    if not cfg["output"]:
        raise UserError("--output is missing: give a folder for the .h5 shards, e.g. --output=data/")
    if not 1 <= cfg["clip_seconds"] <= 600:
        raise UserError(f"clip_seconds={cfg['clip_seconds']} must be between 1 and 600")
    if not 0 <= cfg["min_seconds"] <= cfg["clip_seconds"]:
        raise UserError(f"min_seconds={cfg['min_seconds']} must be between 0 and clip_seconds={cfg['clip_seconds']}")
    if cfg["encode"] not in ("auto", "loop", "batched"):
        raise UserError(f"encode={cfg['encode']!r}: use auto, loop or batched")
    if cfg["bandwidth"] not in (3.0, 6.0, 12.0, 24.0):
        raise UserError(f"bandwidth={cfg['bandwidth']} is not one of Encodec 48 kHz's: 3.0, 6.0, 12.0, 24.0")
    for name, low, high in (("batch_size", 1, 4096), ("num_workers", 0, 256), ("shard_clips", 1, 10**7), ("codec_seed", 0, 2**31),
                            ("check_codec", 0, 10_000)):
        if not low <= cfg[name] <= high:
            raise UserError(f"{name}={cfg[name]} must be between {low} and {high}")


def find_audio(root, out_dir):
    """The audio files under root, by their names (audio.AUDIO_EXTENSIONS), as sorted paths relative to it,
    each real file once: links are followed, but a folder reached twice (a link loop, two links to one
    folder) is read once, and a file reached by two paths is read under the first. Also {extension: count}
    of the other files, which are not read (label files, sidecars and hidden files apart)."""
    files, seen, other = [], set(), Counter()
    for folder, dirs, names in os.walk(root, followlinks=True):
        st = os.stat(folder)
        inside_output = os.path.abspath(folder) == out_dir or os.path.abspath(folder).startswith(out_dir + os.sep)
        if (st.st_dev, st.st_ino) in seen or inside_output:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        stems = {os.path.splitext(n)[0] for n in names if n.lower().endswith(audio.AUDIO_EXTENSIONS)}
        for name in sorted(names):
            path = os.path.join(folder, name)
            stem, ext = os.path.splitext(name)
            if not ext.lower() in audio.AUDIO_EXTENSIONS:
                label = name in ("metadata.csv", "metadata.jsonl") or (ext.lower() in (".txt", ".json") and stem in stems)
                if not (label or name.startswith(".")):
                    other[ext.lower() or "(no extension)"] += 1
                continue
            try:
                st = os.stat(path)
            except OSError:          # a broken link
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                files.append(os.path.relpath(path, root))
    if not files:
        held = f" (it holds {sum(other.values())} files of other kinds: {kinds(other)})" if other else ""
        raise UserError(f"no audio files found under {root}{held}; compress.py reads the formats ffmpeg decodes, by "
                        f"their names: {', '.join(audio.AUDIO_EXTENSIONS)}")
    return sorted(files), other


def kinds(counts):
    return ", ".join(f"{ext} {n}" for ext, n in counts.most_common())


CHANGES = dict(new="new", moved="renamed or moved (the same audio, recognised by its bytes: not encoded again)",
               copied="copies of a file already encoded (not encoded again)",
               replaced="replaced in place (encoded again; the old audio leaves the data)",
               relabelled="relabelled (the new label applies; nothing encoded again)",
               deleted="deleted (their clips leave the data)")


def plan(files, root, out_dir, attrs, labels, rank, world):
    """This rank's share of the folder against what is already encoded: the files to encode, and the index
    entries of those whose audio the shards hold (the same file, or the same bytes under another name),
    each with its label now. Returns (files to encode, {relative path: entry}, {kind of change: [names]})."""
    known, index = encoded_clips(finished_shards(out_dir), attrs), common.read_index(out_dir)
    if index is None:            # shards of an earlier version, without an index: what they say
        before = {rel: e for (rel, *_), e in known.items()}
    else:                        # this folder's files at its last run (none: a folder new to this output)
        before = index["inputs"].get(root, {}).get("files", {})
    by_content, sizes = {}, set()
    for (rel, size, _), e in known.items():
        if e["sha1"]:
            by_content.setdefault(e["sha1"], (rel, e))
            sizes.add(size)
    present, todo, entries, changes = set(files), [], {}, {kind: [] for kind in CHANGES}
    moved_from = set()
    for rel in files[rank::world]:              # split first: shares never depend on timing
        path = os.path.join(root, rel)
        size, mtime = file_identity(path)
        was, e = rel, known.get((rel, size, mtime)) or known.get((rel, None, None))    # (format 1 stored names only)
        sha1 = e and e["sha1"]
        if e is None and size in sizes:         # the same bytes under another name?
            sha1 = file_hash(path)
            was, e = by_content.get(sha1, (rel, None))
        if e is None:
            todo.append(rel)
            changes["replaced" if rel in before else "new"].append(rel)
            continue
        text = labels[rel] or ""
        if was != rel:
            changes["copied" if was in present else "moved"].append(f"{was} → {rel}")
            moved_from.add(was)
        elif rel in before and before[rel]["text"] != text:
            changes["relabelled"].append(f"{rel} ({before[rel]['text']!r} → {text!r})")
        entries[rel] = dict(size=size, mtime_ns=mtime, sha1=sha1, text=text, clips=e["clips"])
    if rank == 0:
        changes["deleted"] = sorted(rel for rel in before if rel not in present and rel not in moved_from)
    return todo, entries, changes


def say_changes(changes, done, out_dir):
    """What is already encoded, and what changed in the folder since the last run: a line per kind of change,
    with the first few names."""
    if done:
        print(f"resuming: {done} files are already in the shards in {out_dir} and are not encoded again")
    for kind, what in CHANGES.items():
        if changes[kind] and (kind != "new" or done):
            print(f"{len(changes[kind])} files {what}: {names(changes[kind])}")


def update_index(out_dir, root, entries, share, present):
    """The index made to say what the data is now, under a lock (other ranks, other runs into the same folder):
    this folder's entries for this rank's share replaced by `entries` (the files found in the shards and those
    encoded; a file of the share not among them is not encoded yet, so its old entry goes too), entries of
    files no longer in the folder dropped, as are other folders' entries of files that no longer exist; the
    rest kept. Returns the number of other folders' files dropped."""
    os.makedirs(out_dir, exist_ok=True)
    with common.held(os.path.join(out_dir, ".index.lock")):
        index = common.read_index(out_dir) or dict(format=common.INDEX_FORMAT, inputs={})
        files = index["inputs"].get(root, {}).get("files", {})
        files = {rel: e for rel, e in files.items() if rel in present and rel not in share}
        index["inputs"][root] = dict(files={**files, **entries})
        dropped = 0
        for other, part in index["inputs"].items():
            if other != root:
                kept = {rel: e for rel, e in part["files"].items() if os.path.exists(os.path.join(other, rel))}
                dropped += len(part["files"]) - len(kept)
                part["files"] = kept
        index["inputs"] = {k: v for k, v in sorted(index["inputs"].items()) if v["files"]}
        with common.disk_errors(os.path.join(out_dir, common.INDEX), "the shards are intact: free some space and rerun"):
            common.write_json(os.path.join(out_dir, common.INDEX), index)
    return dropped


class Encoding:
    """The main process's side of a run: read pieces come in (add), clips are encoded a batch at a time,
    and each file, once all its clips are encoded, goes to the shard writer, in file order. Counts what
    it did and where the time went."""

    def __init__(self, cfg, encodec, dev, writer, labels, root, out_dir, to_check, show_progress, total_seconds):
        self.cfg, self.codec, self.dev, self.writer, self.labels = cfg, encodec, dev, writer, labels
        self.root, self.out_dir, self.to_check = root, out_dir, to_check
        self.batched = cfg["encode"] == "batched" or (cfg["encode"] == "auto" and dev.startswith("cuda"))
        self.stats, self.skipped, self.busy = Counter(), Counter(), Counter()
        self.unlabeled, self.loud, self.checks = [], [], []
        self.pending = []    # clips read but not yet encoded: [(file entry, index, (2, samples))]
        self.entries, self.encoded = {}, {}     # index entries of the files encoded: waiting for their shard, written
        self.files = []      # files in order, each {rel, clips: [[start, codes, scales]], summary, ...}
        self.t0 = time.time()
        self.bar = tqdm(total=total_seconds, unit="audio-s", dynamic_ncols=True, disable=not show_progress,
                        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s of audio encoded [{elapsed}<{remaining}{postfix}]")

    def add(self, piece, entry, seconds):
        """Take one piece of a file; returns the entry of the file still being read (None after its last piece)."""
        if entry is None:
            entry = dict(rel=piece["rel"], clips=[], encoded=0, summary=None, seconds=seconds, advanced=0.0)
            self.files.append(entry)
        for start, wav in piece["clips"]:
            entry["clips"].append([start, None, None])
            self.pending.append((entry, len(entry["clips"]) - 1, wav))
            self.stats["read_seconds"] += wav.shape[1] / SAMPLE_RATE
        self.show_rates()
        if piece["last"]:
            self._file_read(entry, piece)
            entry = None
        if len(self.pending) >= self.cfg["batch_size"]:
            self.encode_pending()
        self.write_finished()
        return entry

    def _file_read(self, entry, r):
        entry["summary"] = r
        self.stats["dropped_remainders"] += r["dropped_seconds"] > 0
        self.stats["silent_clips"] += r["silent_clips"]
        if r["loud_clips"]:
            self.loud.append((entry["rel"], r["loud_clips"], r["peak"]))
        if r["reason"]:      # the whole file is skipped, clips read before the problem included
            self.skipped[r["reason"]] += 1
            self.pending[:] = [p for p in self.pending if p[0] is not entry]
            self.files.remove(entry)
            self.advance(entry, entry["seconds"])
            tqdm.write(f"skip {r['rel']}: {r['reason']}{' (' + r['detail'] + ')' if r['detail'] else ''}")

    def encode_pending(self):
        if not self.pending:
            return
        t, done = time.time(), [0.0] * len(self.pending)     # done: seconds of each clip the bar has counted

        def progress(clips, seconds):                        # a segment of each of these clips is encoded
            for k in clips:
                done[k] += self.advance(self.pending[k][0], seconds)
        encoded = encode_batch(self.codec, [w for _, _, w in self.pending], self.dev, self.batched, progress)
        self.busy["encoding"] += time.time() - t
        for k, ((entry, i, wav), (codes, scales)) in enumerate(zip(self.pending, encoded)):
            entry["clips"][i][1:] = codes, scales
            entry["encoded"] += 1
            if i == 0 and entry["rel"] in self.to_check:
                self.checks.append(check_round_trip(self.codec, wav, codes, scales, self.dev, entry["rel"], self.out_dir,
                                                    len(self.checks)))
            self.advance(entry, wav.shape[1] / SAMPLE_RATE - done[k])
            self.stats["encoded_seconds"] += wav.shape[1] / SAMPLE_RATE
        self.pending.clear()
        self.show_rates()

    def show_rates(self):
        """Beside the bar: the encoding rate (as the summary at the end says it) and how much audio is read so far."""
        rate = self.stats["encoded_seconds"] / max(1e-9, time.time() - self.t0)
        self.bar.set_postfix_str(f"{rate:.1f} audio-s/s, {self.stats['read_seconds']:.0f} s read", refresh=False)

    def advance(self, entry, seconds):
        """The bar counts each file's audio once: its segments as they are encoded, then the rest (what was not
        kept) when the file is done. Returns the seconds counted."""
        seconds = max(0.0, min(seconds, entry["seconds"] - entry["advanced"]))
        entry["advanced"] += seconds
        self.bar.update(seconds)
        return seconds

    def write_finished(self):
        while self.files and self.files[0]["summary"] and self.files[0]["encoded"] == len(self.files[0]["clips"]):
            entry = self.files.pop(0)
            self.advance(entry, entry["seconds"])
            text = self.labels[entry["rel"]]
            if text is None:
                self.unlabeled.append(entry["rel"])
            identity, sha1 = file_identity(os.path.join(self.root, entry["rel"])), entry["summary"]["sha1"]
            self.writer.add([(codes, scales, text or "", f"{entry['rel']}@{start:.2f}", identity, sha1)
                             for start, codes, scales in entry["clips"]])
            self.entries[entry["rel"]] = dict(size=identity[0], mtime_ns=identity[1], sha1=sha1, text=text or "")
            self.stats["clips"] += len(entry["clips"])
            self.stats["steps"] += sum(codes.shape[1] for _, codes, _ in entry["clips"])
            self.stats["files"] += 1
            if len(self.writer) >= self.cfg["shard_clips"]:
                self.flush()

    def flush(self):
        """Write the files encoded so far as a shard, and give them their places in the index."""
        t = time.time()
        for rel, clips in self.writer.flush().items():
            self.encoded[rel] = dict(self.entries.pop(rel), clips=clips)
        self.busy["writing shards"] += time.time() - t

    def run(self, pieces, durations):
        """Read every piece (timing the waits for the readers), then encode and write what is left."""
        entry, durations = None, iter(durations)
        try:
            while True:
                t = time.time()
                piece = next(pieces, None)
                self.busy["waiting for audio"] += time.time() - t
                if piece is None:
                    break
                entry = self.add(piece, entry, next(durations) if entry is None else None)
            self.encode_pending()
            self.write_finished()
            self.flush()
        except KeyboardInterrupt:      # Ctrl-C or SIGTERM: the files encoded so far become a shard
            self.bar.close()
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)    # a second Ctrl-C must not cut that shard short
            try:
                self.flush()
            finally:
                signal.signal(signal.SIGINT, previous)
            raise settings.stopped(f"the files this run encoded ({self.stats['files']}) are in the shards in {self.out_dir}; "
                                 "run the same command again to go on from there" if self.stats["files"] else
                                 "before the first file was encoded: nothing was written; run the same command again to "
                                 "start") from None
        finally:
            self.bar.close()

    def summary(self, attrs, orphans, twice, other):
        s, took = self.stats, max(1e-9, time.time() - self.t0)
        print(f"done in {took:.0f} s: {s['files']} files → {s['clips']} clips, {s['steps'] / FRAME_RATE / 3600:.2f} h "
              f"of audio (codec {attrs['codec']}, {s['encoded_seconds'] / took:.1f} audio-s/s), shards in {self.out_dir}; "
              "time spent " + ", ".join(f"{k} {v / took:.0%}" for k, v in self.busy.items()))
        print(f"skipped files: {sum(self.skipped.values())}" + "".join(f", {k}: {v}" for k, v in sorted(self.skipped.items())))
        print(f"dropped: {s['dropped_remainders']} remainders of 1 s or more but shorter than min_seconds="
              f"{self.cfg['min_seconds']}, {s['silent_clips']} silent clips")
        if self.loud:
            print(f"louder than full scale: {sum(n for _, n, _ in self.loud)} clips in {len(self.loud)} files (peak up to "
                  f"{max(p for *_, p in self.loud):.2f}) were scaled down to peak 1.0, not clipped: "
                  f"{names(r for r, *_ in self.loud)}")
        if self.checks:
            report_codec_check(self.checks, self.out_dir, attrs["codec"])
        print(f"unlabeled files (empty text): {len(self.unlabeled)}" + (f": {names(self.unlabeled)}" if self.unlabeled else ""))
        if orphans:
            print(f"metadata rows that name no audio file (check spelling, folders and letter case): {len(orphans)}: "
                  f"{names(orphans)}")
        if twice:
            print(f"files listed twice in metadata with different labels (the last row's label is kept): {len(twice)}: "
                  + names(f"{path} ({first!r}, then {kept!r})" for path, first, kept in twice))
        if other:
            print(f"not read, not audio by their names: {sum(other.values())} files: {kinds(other)}")


def main(argv):
    cfg = settings.parse_settings(globals(), argv)
    validate(cfg)
    rank, local_rank, world = common.distributed_env()
    dev = common.pick_device(cfg["device"])
    if dev == "cuda" and world > 1:
        dev = f"cuda:{local_rank}"
    root, out_dir = os.path.abspath(cfg["input"]), os.path.abspath(cfg["output"])
    common.check_writable(out_dir, "output")
    common.remove_stale_temps(os.path.join(glob.escape(out_dir), f"shard-r{rank:03d}-*.h5"))   # from killed runs
    n_q = int(cfg["bandwidth"] * 1000 // (FRAME_RATE * 10))
    attrs = dict(format_version=FORMAT_VERSION, sample_rate=SAMPLE_RATE, frame_rate=FRAME_RATE, n_q=n_q,
                 bandwidth=float(cfg["bandwidth"]), codec=codec_name(cfg["codec"], cfg["codec_seed"]),
                 clip_seconds=int(cfg["clip_seconds"]), segment_steps=SEGMENT_STEPS, segment_stride_samples=SEGMENT_STRIDE)
    files, other = find_audio(root, out_dir)
    labels, orphans, twice = load_labels(root, files)
    todo, entries, changes = plan(files, root, out_dir, attrs, labels, rank, world)
    say_changes(changes, len(entries), out_dir)
    share, present = set(files[rank::world]), set(files)
    if not todo:
        update_index(out_dir, root, entries, share, present)
        print(f"nothing to encode: every file is in the shards; {os.path.join(out_dir, common.INDEX)} says what the data is now")
        return 0

    encodec = load_codec(cfg["codec"], cfg["codec_weights"], cfg["codec_seed"], cfg["bandwidth"], dev)
    if cfg["codec"] == "untrained":
        print(f"NOTE: codec=untrained ({attrs['codec']}): random Encodec weights, for tests and demos only. "
              "Tokens are not those of the real encodec, and audio decoded from them will not sound like music.")
    os.makedirs(out_dir, exist_ok=True)
    writer = ShardWriter(out_dir, rank, cfg["clip_seconds"] * SEGMENT_STEPS, cfg["clip_seconds"], attrs)
    n_check = min(cfg["check_codec"], len(todo)) if rank == 0 else 0
    to_check = {todo[i * len(todo) // n_check] for i in range(n_check)} if n_check else set()
    jobs = [(os.path.join(root, rel), rel, cfg["clip_seconds"], cfg["min_seconds"]) for rel in todo]
    seconds = durations([job[0] for job in jobs])
    encoding = Encoding(cfg, encodec, dev, writer, labels, root, out_dir, to_check, rank == 0, sum(seconds))
    settings.stop_on_sigterm()
    try:
        encoding.run(read_in_order(jobs, cfg["num_workers"]), seconds)
    finally:       # finished or stopped: the index says what is in the shards now
        update_index(out_dir, root, {**entries, **encoding.encoded}, share, present)
    encoding.summary(attrs, orphans, twice, other)
    if encoding.stats["clips"] == 0 and not entries:
        print("error: nothing could be encoded (see the skipped files above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
