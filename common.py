"""
Small, general helpers the scripts share: files written safely (atomically, durably, never over what a
script did not make), folder locks, the index of a folder of shards, devices, and file names made from
labels. Settings and how scripts end are in settings.py, audio in audio.py, the codec in codec.py.
"""
import errno
import glob
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import unicodedata
from contextlib import contextmanager, suppress

import torch

from settings import UserError


# -----------------------------------------------------------------------------
# files written safely

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



# -----------------------------------------------------------------------------
# locks

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



# -----------------------------------------------------------------------------
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



# -----------------------------------------------------------------------------
# devices

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
# file names from labels

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
