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
