import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")        # tests never reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def music_dir(tmp_path):
    """Three short labelled stereo clips (metadata.csv) in a fresh folder."""
    import example
    import soundfile as sf
    folder = tmp_path / "music"
    folder.mkdir()
    rows = ["file,text"]
    for i, (kind, mode, tempo) in enumerate([("arpeggio", "major", "fast"), ("pad", "minor", "slow"), ("drums", "major", "fast")]):
        sf.write(folder / f"clip{i}.wav", example.synth_clip(kind, mode, tempo, seconds=4.5, seed=i), 48_000)
        rows.append(f"clip{i}.wav,{example.label(kind, mode, tempo)}")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder


def write_shards(folder, clips=8, steps=300, codec="untrained:seed=0", rank=0, seed=0):
    """Shards in compress.py's format holding learnable synthetic codes: clip i repeats a pattern
    (a ramp with its own stride), labelled with its own text."""
    import numpy as np
    import compress
    os.makedirs(folder, exist_ok=True)
    attrs = dict(format_version=1, sample_rate=48000, frame_rate=150, n_q=4, bandwidth=6.0, codec=codec,
                 clip_seconds=steps // 150, segment_steps=150, segment_stride_samples=47520)
    writer = compress.ShardWriter(str(folder), rank, steps, steps // 150, attrs)
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    for i in range(clips):
        stride = 1 + i % 4
        codes = np.stack([(stride * t + 5 * k + i) % 32 for k in range(4)]).astype(np.int16)
        length = steps if i % 3 else steps - 40             # some clips shorter than the array
        writer.add([(codes[:, :length], rng.uniform(0.05, 0.2, steps // 150).astype(np.float32),
                     ["calm minor pad", "upbeat major arpeggio", "driving minor drums", "melancholic major pad"][i % 4],
                     f"clip{i}.wav@0.00", (0, 0), "")])
    writer.flush()
    return folder


TINY_TRAIN = ["--dim=32", "--depth=1", "--heads=2", "--dim_head=16", "--nb_features=16", "--local_window=16",
              "--seq_len=64", "--max_len=600", "--batch_size=4", "--grad_accum=1", "--num_workers=0",
              "--warmup_steps=2", "--lr=3e-3", "--sample_interval=0", "--log_interval=1", "--device=cpu", "--quality_samples=0"]


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(kib, readonly=False) → a folder on a fresh tmpfs of that size (needs root to mount;
    skipped with the reason where it cannot be made). Unmounted at the end."""
    import subprocess
    mounts = []

    def make(kib, readonly=False):
        folder = tmp_path / f"fs{len(mounts)}"
        folder.mkdir()
        options = f"size={kib}k" + (",ro" if readonly else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a small test filesystem here (needs root): {result.stderr.strip()[:100]}")
        mounts.append(folder)
        return folder
    yield make
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill_disk(folder, leave_kib):
    """Fill the filesystem of `folder` until about `leave_kib` KiB are free."""
    import shutil
    free = shutil.disk_usage(folder).free
    with open(os.path.join(folder, "filler"), "wb") as f:
        f.write(b"\0" * max(0, free - leave_kib * 1024))


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def browser_dom(page, profile, screenshot=None):
    """The DOM of a page file as headless Chromium leaves it after its scripts ran (and a screenshot, if
    asked); the test is skipped where Debian's chromium is not installed."""
    import shutil
    import subprocess
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium installed (.ci/run installs Debian's chromium where it can)")
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
    url = page.as_uri()
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    if screenshot:
        subprocess.run([browser, *flags, "--window-size=1300,1400", f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    return dom


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny model trained for 6 steps on synthetic shards (cond_dropout 0.3, so guidance works)."""
    import deploy
    tmp = tmp_path_factory.mktemp("tiny_ckpt")
    data = write_shards(tmp / "data", steps=450)
    deploy.main(["--data", str(data), "--out", str(tmp / "run"), *TINY_TRAIN, "--max_steps=6", "--eval_interval=6",
                 "--cond_dropout=0.3"])
    return tmp / "run" / "ckpt.pt"
