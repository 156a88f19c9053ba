"""
Helpers shared by the scripts: command-line settings, audio in and out, the Encodec codec,
and writing files atomically. Each script keeps its own settings; only code lives here.
"""
import difflib
import errno
import functools
import glob
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import unicodedata
import warnings
from contextlib import contextmanager, suppress



def _stop_quietly(kind, value, tb, default=sys.excepthook):
    """Ctrl-C that no part of a script caught (while its libraries load, or before it has made anything):
    one line and exit status 130, as every other interruption ends, instead of a traceback. Each script
    imports this module before the large libraries, so that this holds from its first second."""
    if not issubclass(kind, KeyboardInterrupt):
        return default(kind, value, tb)
    print("\nstopped (Ctrl-C) before there was anything to keep", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


sys.excepthook = _stop_quietly

import numpy as np  # noqa: E402  (after the hook above: these take seconds to load)
import torch  # noqa: E402

SAMPLE_RATE = 48_000      # Encodec 48 kHz: everything is resampled to this
CHANNELS = 2              # ... and made stereo
FRAME_RATE = 150          # codec steps per second
SEGMENT_STEPS = 150       # the 48 kHz model codes audio in 1 s segments of 150 steps each ...
SEGMENT_STRIDE = 47_520   # ... that start every 0.99 s (1 % overlap, blended by overlap-add when decoding)
# the names compress.py reads as audio: every format the bundled ffmpeg decodes that music comes in (and the
# audio of video containers); each file is then read by soundfile or ffmpeg (read_native)
AUDIO_EXTENSIONS = (".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".mp2", ".m4a", ".m4b", ".aac", ".alac",
                    ".mp4", ".m4v", ".mov", ".3gp", ".webm", ".weba", ".mka", ".mkv", ".aif", ".aiff", ".aifc", ".caf",
                    ".wma", ".asf", ".wv", ".ape", ".tta", ".mpc", ".ac3", ".eac3", ".dts", ".amr", ".au", ".snd", ".w64")


class UserError(SystemExit):
    """A mistake in the input that the user can fix: one line on stderr, exit status 1, no traceback."""
    def __init__(self, message):
        super().__init__(f"error: {message}")


def first_line(error, limit=120):
    """The first line of an exception's message, at most `limit` characters (its type's name where it says nothing)."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def stop_on_sigterm():
    """SIGTERM (`kill`, a VM being preempted) then stops the run as Ctrl-C does: as a KeyboardInterrupt, which
    the script catches to keep what it made before it exits."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def stopped(kept):
    """The exit of a run stopped by Ctrl-C or SIGTERM once it has kept what it made: one line on stderr that
    says what is kept, exit status 130 (as the shell gives Ctrl-C), no traceback. Raise what it returns."""
    print(f"\nstopped: {kept}", file=sys.stderr)
    return SystemExit(130)


# -----------------------------------------------------------------------------
# settings: plain module-level variables, overridable as --name=value or --name value

def settings(namespace):
    """The editable settings of a script: its lower-case module-level bools, ints, floats, strings and lists."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and k.islower() and isinstance(v, (bool, int, float, str, list))}


def _parse_value(name, text, default):
    if isinstance(default, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{name} takes true or false, not {text!r}")
    for kind in (int, float):
        if isinstance(default, kind):
            try:
                value = kind(text)
                if kind is float and not math.isfinite(value):
                    raise UserError(f"--{name} takes a finite number, not {text!r}")
                return value
            except ValueError:
                try:  # allow 1e4 for an int setting when it is a whole number
                    value = float(text)
                    if kind is int and value.is_integer():
                        return int(value)
                except ValueError:
                    pass
                raise UserError(f"--{name} takes {'a whole number' if kind is int else 'a number'}, not {text!r}")
    return text


# names that other training and generation scripts use for settings this project names otherwise
OTHER_NAMES = dict(learning_rate="lr", epochs="max_steps", epoch="max_steps", steps="max_steps", max_iters="max_steps",
                   num_steps="max_steps", iterations="max_steps", bs="batch_size", batch="batch_size",
                   train_batch_size="batch_size", output_dir=("out", "output"), outdir=("out", "output"),
                   output=("out", "output"), input_dir="input", data_dir="data", dataset="data", resume_from="resume",
                   checkpoint="ckpt", model="ckpt", prompt_text="prompt", text="prompt", description="prompt",
                   duration="seconds", length="seconds", secs="seconds", cfg_scale="cfg", guidance_scale="cfg",
                   guidance="cfg", cfg_coef="cfg", topk="top_k", topp="top_p", temp="temperature", samples="num_samples",
                   n_samples="num_samples", num_workers_per_gpu="num_workers", warmup="warmup_steps", wd="weight_decay",
                   clip_grad="grad_clip", max_grad_norm="grad_clip", gradient_accumulation_steps="grad_accum")


# settings of one script that users give to another, with why they are not there
ELSEWHERE = dict(codec="the codec comes from the shards (compress.py's --codec): a model trains on the tokens its data "
                       "was encoded with, and generate.py decodes with the codec its checkpoint names",
                 codec_seed="the codec comes from the shards (compress.py's --codec_seed)",
                 bandwidth="the codebooks come from the shards (compress.py's --bandwidth)",
                 clip_seconds="clips are cut by compress.py (its --clip_seconds); training crops them to --seq_len")


def suggestion(name, defaults):
    """The setting an unknown name probably means: the name other trainers give it, a near spelling, or the one
    setting it begins."""
    other = OTHER_NAMES.get(name.lower())
    for candidate in (other,) if isinstance(other, str) else other or ():
        if candidate in defaults:
            return candidate
    close = difflib.get_close_matches(name, defaults, n=1)
    starting = [d for d in defaults if d.startswith(name)] if len(name) >= 2 else []
    return close[0] if close else starting[0] if len(starting) == 1 else None


def settings_elsewhere(name, script_path):
    """The other scripts beside `script_path` whose settings block has `name`."""
    import ast
    found = []
    for path in sorted(glob.glob(os.path.join(glob.escape(os.path.dirname(os.path.abspath(script_path))), "*.py"))):
        if os.path.basename(path) == os.path.basename(script_path):
            continue
        try:
            lines = open(path, encoding="utf-8").read().splitlines()
            start = next(i for i, line in enumerate(lines) if line.startswith("# settings"))
            block = "\n".join(itertools.takewhile(lambda line: not line.startswith("# ---"), lines[start + 1:]))
            names = {t.id for node in ast.parse(block).body if isinstance(node, ast.Assign) for t in node.targets
                     if isinstance(t, ast.Name)}
        except (StopIteration, SyntaxError, OSError):
            continue
        if name in names:
            found.append(os.path.basename(path))
    return found


def parse_settings(namespace, argv, given=None):
    """The settings of a script (its module namespace: `settings` picks them) with `--name=value` /
    `--name value` overrides applied. List settings (e.g. prompt) collect every occurrence; a bare `--flag`
    sets a boolean to true. `--help` or `-h` prints the settings block and exits. If `given` is a set, the
    names set on the command line are added to it."""
    defaults = settings(namespace)
    if "--help" in argv or "-h" in argv:
        try:
            print(script_help(namespace), flush=True)
        except BrokenPipeError:            # `--help | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)
    config = {k: list(v) if isinstance(v, list) else v for k, v in defaults.items()}
    seen_lists = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise UserError(f"unexpected argument {arg!r}: settings are given as --name=value (--help lists them)")
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name not in defaults:
            other = OTHER_NAMES.get(name.lower())
            known = any(o in defaults for o in ((other,) if isinstance(other, str) else other or ()))
            script = os.path.basename(namespace.get("__file__", "this script"))
            elsewhere = [] if known else settings_elsewhere(name, namespace.get("__file__", ""))
            close = suggestion(name, defaults)
            if name in ELSEWHERE or elsewhere:
                raise UserError(f"--{name} is not a setting of {script}: "
                                + (ELSEWHERE.get(name) or f"it is {' and '.join(elsewhere)}'s")
                                + f"; --help lists {script}'s settings")
            hint = f" (did you mean --{close}?)" if close else ""
            raise UserError(f"unknown setting --{name}{hint}; --help lists every setting with its default")
        default = defaults[name]
        if not eq:
            if isinstance(default, bool) and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                value = "true"
            elif i + 1 < len(argv):
                i += 1
                value = argv[i]
            else:
                raise UserError(f"--{name} needs a value")
        if given is not None:
            given.add(name)
        if isinstance(default, list):
            if name not in seen_lists:    # the first --prompt replaces the default list
                config[name] = []
                seen_lists.add(name)
            config[name].append(value)
        else:
            config[name] = _parse_value(name, value, default)
        i += 1
    return config


def script_help(namespace):
    """--help: the script's usage lines (the indented lines of its docstring) and its settings block, read
    from the file itself (each setting with its default and comment, the block's group lines between),
    so that it cannot drift from what the script does."""
    import ast
    path = namespace["__file__"]
    source = open(path, encoding="utf-8").read()
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# settings"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("# ---"))
    values = {node.lineno - 1: node for node in ast.parse(source).body if isinstance(node, ast.Assign)
              and start < node.lineno - 1 < end and isinstance(node.targets[0], ast.Name)}
    script = os.path.basename(path)
    doc = (namespace.get("__doc__") or "").strip("\n").splitlines()
    first = " ".join(line.strip() for line in itertools.takewhile(lambda line: line.strip(), doc))   # its first paragraph
    import textwrap
    out = [textwrap.fill(f"{script}: {first}", 110) if first else script, ""]
    usage = [line.rstrip() for line in doc if line.startswith("    ")]
    if usage:
        out += ["usage:", *usage, ""]
    out.append(f"settings (--name=value, or edit them at the top of {script}; defaults shown):")
    for i in range(start + 1, end):
        line = lines[i]
        if i in values:
            node = values[i]
            default = ast.get_source_segment(source, node.value)
            comment = line[node.end_col_offset:].strip().lstrip("#").strip()
            out.append((f"  --{node.targets[0].id}={default}".ljust(33) + f"  {comment}").rstrip())
        elif line.strip().startswith("#"):
            out.append(f"  {line.strip()}")
    return "\n".join(out)


def check_ranges(config, ranges):
    """ranges: {name: "[low, high)"}, in interval notation ("inf" allowed): a setting outside its interval
    stops with one line that names it and the interval."""
    for name, interval in ranges.items():
        low, high = (float(x) for x in interval[1:-1].split(","))
        value = config[name]
        above = value > low or (interval[0] == "[" and value == low)
        below = value < high or (interval[-1] == "]" and value == high)
        if not (above and below):
            raise UserError(f"{name}={value} is out of range: it must be in {interval}")


# -----------------------------------------------------------------------------
# files

@contextmanager
def atomic_path(path, durable=True):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds, so a crash never
    leaves a half-written file where a good one was. durable: the file's bytes reach the disk before the
    rename that makes it visible, and the rename before this returns (fsync), so that a power cut cannot
    leave an empty file under the name either (side files rewritten at every log line pass False)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        if durable:
            sync(tmp)
        os.replace(tmp, path)
        if durable:
            sync(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sync(path):
    """fsync a file or a folder (its entries: a rename into it); a file system that cannot is passed over."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def publish_new(tmp, candidates):
    """Move the finished file `tmp` to the first name in `candidates` that is free, and return it. A hard
    link claims a name atomically: no existing file is ever replaced, whatever runs at the same time."""
    for path in candidates:
        try:
            os.link(tmp, path)
        except FileExistsError:
            continue
        os.remove(tmp)
        sync(os.path.dirname(os.path.abspath(path)))
        return path
    raise UserError(f"no free file name left for {tmp}")


def numbered(path):
    """path, then path_1, path_2, ... (the number before the extension)."""
    stem, ext = os.path.splitext(path)
    yield path
    for n in itertools.count(1):
        yield f"{stem}_{n}{ext}"


def remove_stale_temps(pattern):
    """Delete the temporary files `<pattern>.tmp<pid>` left by atomic_path writes that were killed: those
    whose process no longer runs. `pattern` is a glob (escape the folder part with glob.escape)."""
    for tmp in glob.glob(pattern + ".tmp*"):
        pid = tmp.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not _process_alive(int(pid)):
            try:
                os.remove(tmp)
            except OSError:
                pass


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # alive, but someone else's
        pass
    return True


@contextmanager
def folder_lock(folder, flag):
    """Hold FOLDER/.lock while the block runs, so that one live run at a time writes into `folder`: a second
    stops with one line that names the first one's process. The lock is the system's (flock), so a process
    that died holds none; the file names its holder and is removed at the end, so a run that finds one with
    a name in it and gets the lock knows its last holder was killed, and says that it takes over."""
    import fcntl
    import socket
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, ".lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").split()
            os.close(fd)
            who = f"process {holder[1]} on {holder[0]}" if len(holder) == 2 else "another process"
            raise UserError(f"{folder} is in use by another run ({who}): wait for it to end or stop it, or choose "
                            f"another --{flag}") from None
        with suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break               # else the holder removed this file while it was opened here: take the new one
        os.close(fd)
    try:
        holder = os.pread(fd, 300, 0).decode(errors="replace").split()
        if len(holder) == 2:
            print(f"NOTE: {folder} was last used by process {holder[1]} on {holder[0]}, which ended without letting go of "
                  "it (killed?); this run takes it over")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} {os.getpid()}\n".encode(), 0)
        yield
    finally:
        with suppress(OSError):
            os.remove(path)         # while still holding it
        os.close(fd)


def write_json(path, obj):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)


def check_writable(folder, flag):
    """Prove, before any long work, that files can be written in `folder` (or, where it does not exist yet,
    in the nearest folder above it, where it will be made). Creates nothing."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"--{flag}={folder} is a file, not a folder: choose a folder")
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--{flag}={folder}: {existing} is a file, not a folder: choose another path")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-") as f:
            f.write(b"x")
            f.flush()
    except OSError as e:
        raise UserError(f"cannot write into --{flag}={folder} ({e.strerror}): choose a folder you can write to"
                        + (" on a disk with free space" if e.errno == errno.ENOSPC else "")) from None


# the index of a folder of shards: which clips of which shards are the data now (compress.py writes it, every
# reader of the data reads the shards through it)
INDEX = "index.json"
INDEX_FORMAT = 1


def read_index(folder):
    """A shard folder's index, {"inputs": {input folder: {"files": {relative path: {"size", "mtime_ns", "sha1",
    "text", "clips": [[shard name, row], ...]}}}}}, or None where compress.py has written none (data of an
    earlier version: every clip of every shard is the data). A damaged index stops with one line."""
    path = os.path.join(folder, INDEX)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        if index.get("format") != INDEX_FORMAT or not isinstance(index.get("inputs"), dict):
            raise ValueError(f"format {index.get('format')!r}, not {INDEX_FORMAT}")
        return index
    except (ValueError, OSError, AttributeError) as e:
        raise UserError(f"{path} is damaged or incomplete ({str(e).strip()[:100]}): rerun compress.py on the music folder(s) "
                        "into this folder to write it again (nothing is encoded twice)") from None


@contextmanager
def held(lock_path):
    """The system's lock on lock_path while the block runs, waiting for it (flock): for a short read-modify-write
    shared by processes."""
    import fcntl
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


@contextmanager
def disk_errors(path, intact):
    """Turn a failed write of `path` (disk full, read-only, no permission) into one line that says what is
    still intact, instead of a traceback. Writers that wrap the OSError (torch.save) are seen through."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        cause = e
        while cause is not None and not (isinstance(cause, OSError) and cause.errno in _DISK_ERRNOS):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        what = "no space left on the device" if cause.errno in (errno.ENOSPC, errno.EDQUOT) else cause.strerror.lower()
        raise UserError(f"{what} while writing {path}; {intact}") from None


def check_memory(nbytes, device, what):
    """Stop with one line, before anything is allocated, where `nbytes` cannot fit in the memory free on
    `device` (a CPU: the RAM the system calls available; a GPU: its free memory)."""
    if str(device).startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        try:
            with open("/proc/meminfo") as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            return      # no way to tell here: the allocation itself will say
    if nbytes > free:
        raise UserError(f"{what} needs {nbytes / 2**30:.1f} GiB but {device} has {free / 2**30:.1f} GiB free: choose a "
                        "smaller model (dim, depth) or a machine with more memory")


def distributed_env():
    """(rank, local_rank, world_size) from torchrun's environment variables; (0, 0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def pick_device(name):
    """auto → cuda when torch can use a GPU, else cpu; but a GPU that the system shows and torch cannot
    use stops the run, so a day of training never runs silently on the CPU."""
    if name == "auto" or name.startswith("cuda"):
        if torch.cuda.is_available():
            return "cuda" if name == "auto" else name
        driver = nvidia_driver()
        if driver:
            raise UserError(_unusable_gpu_message(driver))
        if name != "auto":
            raise UserError(f"device={name} but no CUDA GPU is visible; use --device=cpu")
        return "cpu"
    return name


# the oldest driver each CUDA major version runs on (NVIDIA's minor-version compatibility table)
_MIN_DRIVER = {11: 450, 12: 525, 13: 580}


def _unusable_gpu_message(driver):
    cuda = torch.version.cuda
    if cuda is None:
        why = "this torch is a CPU-only build"
    else:
        need = _MIN_DRIVER.get(int(cuda.split(".")[0]))
        why = f"it is built for CUDA {cuda}" + (f", which needs NVIDIA driver {need} or newer" if need else "")
    return (f"an NVIDIA GPU is visible (driver {driver}) but torch {torch.__version__} cannot use it: {why}. Either "
            "update the NVIDIA driver, or install the torch build for your CUDA version from PyTorch's wheel index "
            "(README, troubleshooting: 'GPU not used'); --device=cpu runs on the CPU on purpose")


def nvidia_driver():
    """The NVIDIA driver version if the system shows a GPU (nvidia-smi or a device node), else None."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.split()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        with open("/proc/driver/nvidia/version") as f:
            return f.read().split("Kernel Module")[1].split()[0]
    except (OSError, IndexError):
        pass
    if glob.glob("/dev/nvidia[0-9]*") or smi:
        return "unknown: nvidia-smi does not answer"
    return None


# -----------------------------------------------------------------------------
# audio in

def stream_48k(path, block_seconds=10.0, start=0.0):
    """Yield an audio file (any format read_native reads, any rate and channel count), from `start` seconds
    (read_native), as consecutive float32 (2, n) blocks at 48 kHz stereo. Memory is bounded by the block, not the file, and the blocks joined are
    sample for sample what resampling the whole file at once gives: each block is resampled with enough
    real context on both sides, starting at a multiple of the resampler's period."""
    blocks = read_native(path, block_seconds, start)
    sr, _ = next(blocks)
    if sr == SAMPLE_RATE:
        for block in blocks:
            yield _to_stereo(block)
        return
    import torchaudio.transforms as AT
    g = math.gcd(sr, SAMPLE_RATE)
    period, out_period = sr // g, SAMPLE_RATE // g          # every `period` inputs give `out_period` outputs
    resample = AT.Resample(sr, SAMPLE_RATE, dtype=torch.float32)   # the kernel torchaudio.functional.resample uses
    context = period * -(-512 // period)                    # > the resampling kernel's reach, a whole number of periods
    step = period * max(1, round(block_seconds * sr / period))
    buf, buf_start, start, total = torch.zeros(2, 0), 0, 0, 0

    def resampled(end, at_end):
        a = max(0, start - context)
        y = resample(buf[:, a - buf_start:(total if at_end else end + context) - buf_start])
        last = math.ceil(total * out_period / period) if at_end else end // period * out_period
        skip = (start - a) // period * out_period
        return y[:, skip:skip + last - start // period * out_period]

    for block in _rechunked(blocks, step):
        buf = torch.cat([buf, _to_stereo(block)], 1)
        total += block.shape[0]
        while total >= start + step + context:
            yield resampled(start + step, False)
            start += step
            keep = max(0, start - context)
            buf, buf_start = buf[:, keep - buf_start:], keep
    while start < total:
        end = min(start + step, total)
        yield resampled(end, end == total)
        start = end


def _rechunked(blocks, frames):
    """(n, C) blocks of any sizes → blocks of exactly `frames` (the last one shorter)."""
    pending, held = [], 0
    for block in blocks:
        pending.append(block)
        held += len(block)
        if held >= frames:
            joined = np.concatenate(pending)
            for i in range(0, len(joined) - frames + 1, frames):
                yield joined[i:i + frames]
            rest = joined[len(joined) // frames * frames:]
            pending, held = [rest], len(rest)
    if held:
        yield np.concatenate(pending)


def _soundfile_reads(path):
    """soundfile's description of the file, where libsndfile reads it well: not MP3, whose partial reads
    glitch at their edges in libsndfile; None otherwise."""
    import soundfile as sf
    try:
        info = sf.info(path)
    except Exception:
        return None
    return info if info.format != "MP3" and info.frames > 0 else None


def read_native(path, block_seconds=10.0, start=0.0):
    """The one reader of audio files. Yields (sample rate, channels) first, then float32 (frames, channels)
    blocks of about block_seconds at the file's own rate, from `start` seconds on (a negative start counts
    from the end): a seek, so that what comes before is not decoded. soundfile reads what libsndfile reads
    well (WAV, FLAC, Ogg, Opus, AIFF, ...); everything else ffmpeg can decode (MP3, M4A/AAC, WebM, WMA, the
    audio of a video, ...) comes from the bundled ffmpeg as a WAV stream, the first audio stream of the
    file. Memory is bounded by a block either way. A file neither can read raises ValueError with ffmpeg's
    reason."""
    info = _soundfile_reads(path)
    if info is not None:
        import soundfile as sf
        yield info.samplerate, info.channels
        with warnings.catch_warnings(), sf.SoundFile(path) as f:
            warnings.simplefilter("ignore")
            if start:
                f.seek(min(info.frames, max(0, round((start if start > 0 else info.duration + start) * info.samplerate))))
            while True:
                block = f.read(max(1, int(block_seconds * info.samplerate)), dtype="float32", always_2d=True)
                if not len(block):
                    return
                yield block
    seek = [] if not start else ["-ss", f"{start:.3f}"] if start > 0 else ["-sseof", f"{start:.3f}"]
    cmd = [ffmpeg_exe(), "-v", "error", "-nostdin", *seek, "-i", path, "-map", "0:a:0", "-vn", "-map_metadata", "-1",
           "-c:a", "pcm_f32le", "-f", "wav", "-"]
    with tempfile.TemporaryFile() as errors:            # a file, not a pipe: ffmpeg never waits on its messages
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors)
        try:
            rate, channels = _wav_header(proc.stdout)
            if rate is None:
                proc.wait()
                errors.seek(0)
                raise ValueError(_ffmpeg_reason(errors.read()))
            yield rate, channels
            width = 4 * channels
            frames = max(1, int(block_seconds * rate))
            while True:
                data = proc.stdout.read(frames * width)
                if len(data) >= width:
                    yield np.frombuffer(data[:len(data) // width * width], np.float32).reshape(-1, channels)
                if len(data) < frames * width:
                    break
            if proc.wait() != 0:
                errors.seek(0)
                raise ValueError(_ffmpeg_reason(errors.read()))
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()


def _wav_header(stream):
    """(sample rate, channels) from the head of a WAV stream, read up to its data chunk; (None, None) if
    the stream ends first (ffmpeg could not decode the file)."""
    import struct
    if stream.read(12)[8:12] != b"WAVE":
        return None, None
    rate = channels = None
    while True:
        head = stream.read(8)
        if len(head) < 8:
            return None, None
        kind, size = head[:4], struct.unpack("<I", head[4:])[0]
        if kind == b"data":
            return (rate, channels) if rate else (None, None)
        body = stream.read(size + size % 2)
        if kind == b"fmt ":
            channels, rate = struct.unpack("<HI", body[2:8])


def _ffmpeg_reason(message):
    lines = message.decode(errors="replace").strip().splitlines()
    return lines[-1].strip() if lines else "ffmpeg found no audio in it"


def audio_seconds(path):
    """The length of an audio file in seconds without decoding it: soundfile's header, else what ffmpeg says
    of the file (None where the file does not say). Raises ValueError with the reason for a file that holds
    no audio either can read."""
    info = _soundfile_reads(path)
    if info is not None:
        return info.duration
    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", path], capture_output=True, timeout=120)
    text = out.stderr.decode(errors="replace")
    if not re.search(r"Stream #\S+.*?: Audio: ", text):
        lines = [line.strip() for line in text.splitlines() if line.strip() and "output file" not in line]
        raise ValueError(lines[-1].replace(f"{path}: ", "") if lines else "no audio stream in it")
    duration = re.search(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)", text)
    return int(duration[1]) * 3600 + int(duration[2]) * 60 + float(duration[3]) if duration else None


def _to_stereo(block):
    """(frames, C) → (2, frames). Mono is duplicated; beyond two channels, the first two are kept as
    left/right and the rest mixed equally into both (a plain downmix)."""
    audio = block.T
    if audio.shape[0] == 1:
        audio = np.repeat(audio, 2, axis=0)
    elif audio.shape[0] > 2:
        audio = audio[:2] + 0.5 * audio[2:].mean(axis=0, keepdims=True)
    return torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))


def load_audio(path, last_seconds=None):
    """A whole file as (2, N) float32 at 48 kHz, or only its last `last_seconds`: read from a second before them
    (the resampler's context), never from the start of a long file."""
    keep = None if last_seconds is None else int(last_seconds * SAMPLE_RATE)
    out = torch.zeros(2, 0)
    for block in stream_48k(path, start=0.0 if last_seconds is None else -(last_seconds + 1.0)):
        out = torch.cat([out, block], 1)
        if keep is not None and out.shape[1] > 2 * keep:
            out = out[:, -keep:]
    return out if keep is None else out[:, -keep:]


# -----------------------------------------------------------------------------
# audio out

def ffmpeg_exe():
    import imageio_ffmpeg
    return imageio_ffmpeg.get_ffmpeg_exe()


class AudioWriter:
    """Writes 48 kHz stereo audio as it comes: write((2, n) float) appends, close() gives the file its final
    name. Until then it lives under `<name>.partial.<ext>`, a name that says so, which is what an interrupted
    run leaves behind. The final name never replaces an existing file (a number is added instead) unless
    overwrite=True. WAV: the header is rewritten after each append, so the file is always a valid WAV of what
    has been written; MP3: the samples go through the bundled ffmpeg, which writes MP3 frames as they come."""

    def __init__(self, path, fmt="mp3", bitrate="192k", overwrite=False):
        if fmt not in ("mp3", "wav"):
            raise UserError(f"format={fmt!r} is not supported; use mp3 or wav")
        self.path, self.fmt, self.overwrite, self.samples, self.finished = path, fmt, overwrite, 0, None
        stem, ext = os.path.splitext(path)
        for partial in numbered(f"{stem}.partial{ext}"):
            try:
                self.file = open(partial, "xb")       # claims the name: concurrent runs never share one
                break
            except FileExistsError:
                continue
        self.partial = partial
        if fmt == "wav":
            import wave
            self.wav = wave.open(self.file, "wb")
            self.wav.setnchannels(CHANNELS)
            self.wav.setsampwidth(2)
            self.wav.setframerate(SAMPLE_RATE)
        else:
            self.file.close()
            cmd = [ffmpeg_exe(), "-v", "error", "-nostdin", "-y", "-probesize", "32", "-analyzeduration", "0", "-f", "s16le", "-ar", str(SAMPLE_RATE), "-ac", str(CHANNELS),
                   "-i", "pipe:0", "-c:a", "libmp3lame", "-b:a", bitrate, "-flush_packets", "1", "-f", "mp3", partial]
            self.ffmpeg = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)

    def write(self, wav):
        pcm = (wav.detach().float().clamp(-1, 1).cpu().numpy().T * 32767).astype(np.int16)   # (n, 2)
        self.samples += pcm.shape[0]
        if self.fmt == "wav":
            self.wav.writeframes(pcm.tobytes())
            self.file.flush()
        else:
            try:
                self.ffmpeg.stdin.write(pcm.tobytes())
                self.ffmpeg.stdin.flush()
            except BrokenPipeError:
                self._ffmpeg_failed()

    def _ffmpeg_failed(self):
        message = self.ffmpeg.stderr.read().decode(errors="replace").strip().splitlines()
        raise UserError(f"ffmpeg could not write {self.partial}: {message[-1] if message else 'it stopped'}")

    def _finish_encoding(self):
        if self.fmt == "wav":
            self.wav.close()
            self.file.close()
        else:
            self.ffmpeg.stdin.close()
            if self.ffmpeg.wait() != 0:
                self._ffmpeg_failed()

    def close(self, meta=None):
        """Finish the file and give it its final name (returned). With meta, its `.json` is written first, beside
        the partial file, and renamed with it: a piece that has its final name has its .json."""
        self._finish_encoding()
        if meta is not None:
            write_json(self.partial + ".json", meta)
        if self.overwrite:
            os.replace(self.partial, self.path)
            final = self.path
        else:
            final = publish_new(self.partial, (p for p in numbered(self.path) if not os.path.exists(p + ".json")))
        if meta is not None:
            os.replace(self.partial + ".json", final + ".json")
        self.finished = final
        return final

    def abort(self):
        """Stop writing and keep what was written under its partial name (returned); a file with no audio
        in it yet is removed instead (None), and so is a .json written for it. A finished file: None."""
        if self.finished:
            return None
        with suppress(FileNotFoundError):
            os.remove(self.partial + ".json")
        try:
            self._finish_encoding()
        except (UserError, OSError, ValueError):
            pass
        if self.samples:
            return self.partial
        with suppress(FileNotFoundError):
            os.remove(self.partial)
        return None


def write_audio(path, wav, fmt="mp3", bitrate="192k", overwrite=True):
    """Write (2, N) float audio at 48 kHz as MP3 (through the bundled ffmpeg) or WAV, in one go. Returns the
    name written (see AudioWriter for overwrite=False)."""
    writer = AudioWriter(path, fmt, bitrate, overwrite)
    try:
        writer.write(wav)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def slug(text, limit=60):
    """A file name for a label: its letters, marks and digits in any script (lower case, NFC), every run of
    anything else one '_', at most `limit` characters; 'unconditional' for the empty text, and a short hash
    of the text for one with no letter or digit at all."""
    text = unicodedata.normalize("NFC", text).lower()
    kept = "".join(c if unicodedata.category(c)[0] in "LMN" else "_" for c in text)
    name = re.sub("_+", "_", kept).strip("_")[:limit].strip("_")
    return name or ("unconditional" if not text.strip() else f"label_{_short_hash(text)}")


def file_names(texts, limit=60):
    """A file name for each text (slug), no two the same: where different texts share a slug, each gets a
    short hash of its text added; a text given again gets _1, _2, ... in order."""
    slugs = [slug(t, limit) for t in texts]
    owners = {}
    for text, name in zip(texts, slugs):
        owners.setdefault(name, set()).add(text)
    names, seen = [], {}
    for text, name in zip(texts, slugs):
        name = f"{name}_{_short_hash(text)}" if len(owners[name]) > 1 else name
        names.append(f"{name}_{seen[name]}" if seen.get(name) else name)
        seen[name] = seen.get(name, 0) + 1
    return names


def _short_hash(text):
    import hashlib
    return hashlib.sha1(text.encode()).hexdigest()[:6]


def write_spectrogram(path, wav):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.specgram(wav.float().mean(0).cpu().numpy(), NFFT=2048, Fs=SAMPLE_RATE, noverlap=1536, cmap="magma")
    ax.set_xlabel("seconds"); ax.set_ylabel("Hz")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


# -----------------------------------------------------------------------------
# the codec

def codec_name(codec, seed):
    """The string stored with the data that says which codec made the tokens."""
    return f"untrained:seed={seed}" if codec == "untrained" else "encodec_48khz"


def codec_for(data_info, weights, device):
    """The codec that made a model's training data (pretrained, local weights, or untrained with its seed)."""
    kind, codec_seed = parse_codec_name(data_info["codec"])
    bandwidth = data_info["n_q"] * FRAME_RATE * 10 / 1000
    return load_codec(kind, weights or data_info.get("codec_weights", ""), codec_seed, bandwidth, device)


def parse_codec_name(name):
    """Inverse of codec_name: 'untrained:seed=3' → ('untrained', 3), 'encodec_48khz' → ('pretrained', 0)."""
    if name.startswith("untrained:seed="):
        return "untrained", int(name.split("=", 1)[1])
    if name == "encodec_48khz":
        return "pretrained", 0
    raise UserError(f"unknown codec {name!r} in the data or checkpoint")


@functools.lru_cache(maxsize=4)
def load_codec(codec="pretrained", weights="", seed=0, bandwidth=6.0, device="cpu"):
    """Encodec 48 kHz in eval mode. codec: 'pretrained' (official weights, from `weights` when given,
    else downloaded by the encodec package) or 'untrained' (seeded random weights, for offline tests)."""
    from encodec import EncodecModel
    if codec == "untrained":
        model = _untrained_codec(seed)
    elif codec == "pretrained":
        model = EncodecModel.encodec_model_48khz(pretrained=False)
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True) if weights else _download_codec_weights()
            model.load_state_dict(state)
        except Exception as e:
            import pickle
            reason = ("it is not a file of plain tensors" if isinstance(e, pickle.UnpicklingError)
                      else f"{type(e).__name__}: {first_line(e, 200)}")
            raise UserError(
                f"could not load the pretrained Encodec 48 kHz weights{' from ' + weights if weights else ''} ({reason}). "
                "Either give a local copy with --codec_weights=PATH/encodec_48khz-7e698e3e.th, or use "
                "--codec=untrained (random codec: for tests and demos only, it will not sound like music)") from None
    else:
        raise UserError(f"codec={codec!r} is not known; use pretrained or untrained")
    model.set_target_bandwidth(bandwidth)
    return model.eval().to(device)


def _download_codec_weights():
    import socket
    url = "https://dl.fbaipublicfiles.com/encodec/v0/encodec_48khz-7e698e3e.th"
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)   # a firewalled machine fails in a minute instead of hanging
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, progress=False, weights_only=True)
    finally:
        socket.setdefaulttimeout(previous)


def _calibration_audio(seed, seconds=12):
    """Seeded pseudo-music (harmonic notes, chords, noise bursts at varied loudness): the same on every
    machine, and independent of any user data. Used to place the untrained codec's codebooks."""
    g = torch.Generator().manual_seed(seed)
    n = seconds * SAMPLE_RATE
    t = torch.arange(n, dtype=torch.float64) / SAMPLE_RATE
    out = torch.zeros(2, n, dtype=torch.float64)
    note = SAMPLE_RATE // 4
    for start in range(0, n, note):
        length = min(note * int(torch.randint(1, 5, (1,), generator=g)), n - start)
        env = torch.exp(-torch.linspace(0, float(torch.rand(1, generator=g)) * 8, length, dtype=torch.float64))
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            f0 = 55.0 * 2 ** (float(torch.rand(1, generator=g)) * 6)
            tone = sum(torch.sin(2 * math.pi * f0 * h * t[start:start + length]) / h for h in range(1, 6))
            pan = float(torch.rand(1, generator=g))
            out[0, start:start + length] += env * tone * pan
            out[1, start:start + length] += env * tone * (1 - pan)
        if float(torch.rand(1, generator=g)) < 0.4:
            noise = torch.randn(2, length, generator=g, dtype=torch.float64)
            out[:, start:start + length] += noise * env * float(torch.rand(1, generator=g))
    loud = torch.exp(torch.randn(n // SAMPLE_RATE + 1, generator=g, dtype=torch.float64))
    out *= loud.repeat_interleave(SAMPLE_RATE)[:n]
    return (out / out.abs().max()).float()


def _untrained_codec(seed):
    """Encodec 48 kHz with seeded random weights and usable codebooks: each residual codebook is set to
    1024 encoder outputs (residuals) of seeded calibration audio, pulled halfway toward their mean so that
    audio unlike the calibration still spreads over many codes (about 500 per codebook on music)."""
    from encodec import EncodecModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EncodecModel.encodec_model_48khz(pretrained=False)
    model.eval()
    books = [layer._codebook for layer in model.quantizer.vq.layers]
    # the calibration takes seconds on a CPU: its result is kept in a cache (a pure function of the seed)
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "music-transformer",
                         f"untrained-codec-{seed}-torch{torch.__version__}.pt")
    try:
        for book, entries in zip(books, torch.load(cache, weights_only=True)):
            book.embed.copy_(entries)
            book.embed_avg.copy_(entries)
            book.inited.fill_(1)
        return model
    except Exception:
        pass
    audio = _calibration_audio(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        segments = audio[:, :audio.shape[1] // SAMPLE_RATE * SAMPLE_RATE].reshape(2, -1, SAMPLE_RATE).transpose(0, 1)
        scale = segments.mean(1, keepdim=True).pow(2).mean(2, keepdim=True).sqrt() + 1e-8
        residual = model.encoder(segments / scale)                    # (S, 128, 150)
        residual = residual.transpose(1, 2).reshape(-1, residual.shape[1])  # (S*150, 128)
        for layer in model.quantizer.vq.layers:
            book = layer._codebook
            pick = torch.randperm(residual.shape[0], generator=g)[:book.codebook_size]
            mean = residual.mean(0)
            entries = mean + 0.5 * (residual[pick] - mean)
            book.embed.copy_(entries)
            book.embed_avg.copy_(entries)
            book.inited.fill_(1)
            residual = residual - book.dequantize(book.quantize(residual))
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with atomic_path(cache) as tmp:
            torch.save([book.embed.clone() for book in books], tmp)
    except OSError:
        pass          # no cache: the next run calibrates again
    return model


def encode_clips(codec, clips, batched=False, per_call=64, progress=None):
    """Clips (a list of (2, clip_samples(S)) tensors, any lengths) → [(codes (n_q, 150·S), scales (S,))], as
    the encodec package's model.encode gives them: each 1 s segment (one every 0.99 s) is normalised by its
    own loudness and encoded on its own. The loudness is taken clip by clip, so it never depends on what
    else is in the batch (the package's batched reduction can differ in the last bit).
    batched=False: the package's loop, one segment position at a time across the clips of equal length;
    batched=True: all segments of all clips together, per_call at a time: fewer, larger calls for a GPU.
    progress(clip indices, seconds) is called after each codec call: a segment of each of those clips is
    encoded, each `seconds` of their audio."""
    normalised, scales, owner = [], [], []        # owner: (clip, segment) of each normalised segment
    codes = {}
    step = SEGMENT_STRIDE / SAMPLE_RATE
    for length in sorted({c.shape[-1] for c in clips}):
        same = [i for i, c in enumerate(clips) if c.shape[-1] == length]
        x = torch.stack([clips[i] for i in same])                      # (B, 2, L)
        for j in range(whole_segments(length)):
            frame = x[:, :, j * SEGMENT_STRIDE:j * SEGMENT_STRIDE + SAMPLE_RATE]
            scale = torch.cat([1e-8 + f.mean(dim=1, keepdim=True).pow(2).mean(dim=2, keepdim=True).sqrt()
                               for f in frame.split(1)])               # (B, 1, 1), one clip at a time
            scales.append(scale.view(-1))
            owner += [(i, j) for i in same]
            if batched:
                normalised.append(frame / scale)
            else:
                codes[j, length] = _quantise(codec, frame / scale)
                if progress:
                    progress(same, step)
    if batched:
        parts = torch.cat(normalised).split(per_call)
        found = []
        for k, part in enumerate(parts):
            found.append(_quantise(codec, part))
            if progress:
                progress([i for i, _ in owner[k * per_call:(k + 1) * per_call]], step)
        found = torch.cat(found)
    else:
        found = torch.cat([codes[key] for key in sorted(codes, key=lambda k: (k[1], k[0]))])
    out = [[None] * whole_segments(c.shape[-1]) for c in clips]
    for (i, j), code, scale in zip(owner, found, torch.cat(scales)):
        out[i][j] = (code, scale)
    return [(torch.cat([c for c, _ in segs], -1), torch.stack([s for _, s in segs])) for segs in out]


def _quantise(codec, x):
    """Normalised segments (N, 2, 48000) → codes (N, n_q, 150): the codec's encoder and quantiser."""
    return codec.quantizer.encode(codec.encoder(x), codec.frame_rate, codec.bandwidth).transpose(0, 1)


class SegmentStream:
    """Decodes codes one segment (up to 150 steps, 1 s) at a time, as they are made, with the codec's own
    linear overlap-add: push() returns the samples no later segment can change, finish() the rest. Joined,
    they equal the package's decode of all the codes at once, sample for sample, and memory stays that of
    one segment at any length."""

    def __init__(self, codec, scale=None):
        self.codec, self.scale = codec, scale
        self.tail = self.tail_weight = None                 # the last segment's part the next one overlaps
        self.weight = None

    def push(self, codes, scale=None):
        """codes (B, n_q, n ≤ 150), at the loudness `scale` (B,) (default: the stream's one number) →
        finished audio (B, 2, samples)."""
        scale = torch.as_tensor(self.scale if scale is None else scale, dtype=torch.float32, device=codes.device)
        scale = scale.expand(codes.shape[0]).reshape(-1, 1)
        # the package decodes each segment on its own (its _decode_frame), then overlap-adds them
        frame = self.codec._decode_frame((codes, scale))
        if self.weight is None:                             # encodec's triangle, over a full segment
            t = torch.linspace(0, 1, SAMPLE_RATE + 2, device=frame.device, dtype=frame.dtype)[1:-1]
            self.weight = 0.5 - (t - 0.5).abs()
        n, overlap = frame.shape[-1], SAMPLE_RATE - SEGMENT_STRIDE
        weighted = self.weight[:n] * frame
        head = min(n, overlap)
        if self.tail is not None:                           # (earlier + this) / (their weights), in the package's order
            done = [(self.tail[..., :head] + weighted[..., :head]) / (self.tail_weight[:head] + self.weight[:head])]
        else:
            done = [weighted[..., :head] / self.weight[:head]]
        keep = SEGMENT_STRIDE if n > SEGMENT_STRIDE else n    # a full segment's end waits for the next one
        done.append(weighted[..., head:keep] / self.weight[head:keep])
        self.tail, self.tail_weight = (weighted[..., keep:], self.weight[keep:n]) if keep < n else (None, None)
        return torch.cat(done, -1)

    def finish(self):
        """The end of the last segment: (B, 2, samples), empty if there is none."""
        if self.tail is None:
            return torch.zeros(0)
        out, self.tail = self.tail / self.tail_weight, None
        return out


def decode_codes(codec, codes, scales):
    """codes (B, n_q, T) → audio (B, 2, N): the codec's own decode, segment by segment with its overlap-add
    (through SegmentStream, which also takes a last segment shorter than the overlap). scales: one loudness
    for everything, or (B, ceil(T / 150)) per segment."""
    stream = SegmentStream(codec, scales if not torch.is_tensor(scales) else None)
    parts = [stream.push(codes[..., i:i + SEGMENT_STEPS], scales[:, j] if torch.is_tensor(scales) else None)
             for j, i in enumerate(range(0, codes.shape[-1], SEGMENT_STEPS))]
    return torch.cat(parts + ([stream.finish()] if stream.tail is not None else []), -1)


HOP = SAMPLE_RATE // FRAME_RATE   # samples per codec step (320)


def decoded_samples(steps):
    """Samples of audio that `steps` codec steps decode to: whole segments of 150 steps overlap (150 steps make
    1 s, 300 make 1.99 s), and a last partial segment of k steps adds k · 320 samples."""
    whole, rest = divmod(steps, SEGMENT_STEPS)
    return whole * SEGMENT_STRIDE + rest * HOP if rest else clip_samples(whole)


def steps_for(seconds):
    """(steps, samples) for a piece of `seconds`: the fewest codec steps whose audio lasts at least that long,
    and the samples that are exactly that long (the audio beyond them is cut)."""
    samples = max(1, round(seconds * SAMPLE_RATE))
    steps = -(-samples // HOP)                    # a lower bound: overlaps only shorten the audio
    while decoded_samples(steps) < samples:
        steps += 1
    return steps, samples


def clip_samples(segments):
    """Samples of audio that the codec turns into exactly `segments` full segments (150 steps each)."""
    return (segments - 1) * SEGMENT_STRIDE + SAMPLE_RATE


def whole_segments(samples):
    """How many full codec segments fit in `samples` of audio (0 below 1 s): the inverse of clip_samples."""
    return (samples - SAMPLE_RATE) // SEGMENT_STRIDE + 1 if samples >= SAMPLE_RATE else 0
