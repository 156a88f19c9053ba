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
        writer.add(codes[:, :length], rng.uniform(0.05, 0.2, steps // 150).astype(np.float32),
                   ["calm minor pad", "upbeat major arpeggio", "driving minor drums", "melancholic major pad"][i % 4],
                   f"clip{i}.wav@0.00")
    writer.flush()
    return folder


TINY_TRAIN = ["--dim=32", "--depth=1", "--heads=2", "--dim_head=16", "--nb_features=16", "--local_window=16",
              "--seq_len=64", "--max_len=600", "--batch_size=4", "--grad_accum=1", "--num_workers=0",
              "--warmup_steps=2", "--lr=3e-3", "--sample_interval=0", "--log_interval=1", "--device=cpu"]
