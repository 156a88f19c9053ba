"""A newcomer's second hour: signs of life from the first seconds, one Ctrl-C ends any script, a small recipe to
copy, pages and lines that tell the truth."""
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import codec
from conftest import ROOT


def test_compress_counts_each_segment_as_it_is_encoded_not_each_batch():
    """The bar moves with every encodec call: a segment position across the batch (the package's loop), or a batched
    call, never only once per batch of clips."""
    encodec = codec.load_codec("untrained", "", 0, 6.0, "cpu")
    clips = [torch.randn(2, codec.clip_samples(s)) * 0.1 for s in (3, 3, 2)]
    for batched in (False, True):
        calls = []
        codec.encode_clips(encodec, clips, batched=batched, per_call=4, progress=lambda ids, seconds: calls.append((list(ids), seconds)))
        counted = [sum(seconds * ids.count(i) for ids, seconds in calls) for i in range(3)]
        assert len(calls) >= 2 and counted == pytest.approx([3 * 0.99, 3 * 0.99, 2 * 0.99])


def test_one_ctrl_c_ends_example_py_during_training(tmp_path):
    """One Ctrl-C (SIGINT to the terminal's process group) during example.py's training: the run is saved, exit status
    130, and no later stage starts."""
    proc = subprocess.Popen([sys.executable, "example.py", f"--out={tmp_path / 'ex'}", "--codec=untrained", "--clips_per_label=1",
                             "--clip_seconds=2", "--steps=100000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    said = []
    for line in proc.stdout:
        said.append(line)
        if re.match(r"step \d+/100000", line):         # training has started
            break
    os.killpg(proc.pid, signal.SIGINT)
    said += proc.communicate(timeout=120)[0].splitlines(keepends=True)
    text = "".join(said)
    assert proc.returncode == 130, text[-2000:]
    assert "stopped: the run is saved at step" in text and "4/4" not in text and "Traceback" not in text
    assert (tmp_path / "ex" / "run" / "ckpt.pt").exists() and not (tmp_path / "ex" / "samples").exists()
