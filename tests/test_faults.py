"""Faults a user meets: outputs that cannot be written, full disks, settings at their edges, files that
are not what they claim, a GPU that torch cannot use. Each ends in one line that says what to change,
before any long work, and nothing already written is lost."""
import os
import pickle
import stat

import pytest
import soundfile as sf
import torch

import checkpoint
import codec
import common
import compress
import deploy
import example
import export
import generate
from conftest import TINY_TRAIN, fill_disk, write_shards

FAST = ["--codec=untrained", "--clip_seconds=2", "--min_seconds=1", "--num_workers=0", "--device=cpu", "--check_codec=0"]


def one_line(excinfo):
    message = str(excinfo.value.code)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message
    return message


def music(folder, n=3, seconds=2.5):
    folder.mkdir(exist_ok=True)
    for i in range(n):
        sf.write(folder / f"f{i}.wav", example.synth_clip(seconds=seconds, seed=i), 48_000)
    return folder


# -----------------------------------------------------------------------------
# outputs that cannot be written

def test_output_that_is_a_file_fails_before_any_work(tmp_path, tiny_ckpt):
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(SystemExit) as e:
        compress.main(["--input", str(music(tmp_path / "m")), "--output", str(tmp_path / "afile"), *FAST])
    assert "--output=" in one_line(e) and "is a file, not a folder" in one_line(e)
    data = write_shards(tmp_path / "data")
    with pytest.raises(SystemExit) as e:
        deploy.main(["--data", str(data), "--out", str(tmp_path / "afile"), *TINY_TRAIN])
    assert "--out=" in one_line(e) and "is a file" in one_line(e)
    with pytest.raises(SystemExit) as e:
        generate.main(["--ckpt", str(tiny_ckpt), "--prompt=x", "--out", str(tmp_path / "afile"), "--seconds=1"])
    assert "is a file" in one_line(e)
    with pytest.raises(SystemExit) as e:
        export.main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "afile")])
    assert "--out=" in one_line(e) and "is a file" in one_line(e)
    assert (tmp_path / "afile").read_text() == "mine"


def test_read_only_output_fails_before_any_work(tmp_path, small_disk, tiny_ckpt):
    ro = small_disk(64, readonly=True)
    for run in (lambda: compress.main(["--input", str(music(tmp_path / "m")), "--output", str(ro / "data"), *FAST]),
                lambda: deploy.main(["--data", str(write_shards(tmp_path / "data")), "--out", str(ro / "run"), *TINY_TRAIN]),
                lambda: generate.main(["--ckpt", str(tiny_ckpt), "--prompt=x", "--out", str(ro), "--seconds=1"])):
        with pytest.raises(SystemExit) as e:
            run()
        assert "cannot write into" in one_line(e) and "read-only" in one_line(e).lower()


def test_full_disk_during_compress_keeps_finished_shards(tmp_path, small_disk):
    disk = small_disk(1024)
    fill_disk(disk, leave_kib=40)           # room for two small shards, not for three
    with pytest.raises(SystemExit) as e:
        compress.main(["--input", str(music(tmp_path / "m", n=6)), "--output", str(disk / "data"), *FAST, "--shard_clips=1"])
    message = one_line(e)
    assert "no space left on the device while writing" in message and "shards finished before it are intact" in message
    shards = compress.finished_shards(str(disk / "data"))
    assert 1 <= len(shards) < 6
    assert compress.encoded_clips(shards, dict(codec="untrained:seed=0", bandwidth=6.0, clip_seconds=2, n_q=4))
    assert not [p for p in os.listdir(disk / "data") if ".tmp" in p]
    os.remove(disk / "filler")               # space again: the same command resumes and finishes
    assert compress.main(["--input", str(tmp_path / "m"), "--output", str(disk / "data"), *FAST, "--shard_clips=1"]) == 0
    assert sorted(deploy.Shards(str(disk / "data")).sources) == [f"f{i}.wav" for i in range(6)]      # each file once


def test_full_disk_during_training_keeps_the_last_checkpoint(tmp_path, small_disk):
    disk = small_disk(16384)
    data = write_shards(tmp_path / "data")
    deploy.main(["--data", str(data), "--out", str(disk / "run"), *TINY_TRAIN, "--max_steps=2", "--eval_interval=2"])
    before = (disk / "run" / "ckpt.pt").read_bytes()
    fill_disk(disk, leave_kib=16)
    with pytest.raises(SystemExit) as e:
        deploy.main(["--data", str(data), "--out", str(disk / "run"), "--resume", "--max_steps=4"])
    message = one_line(e)
    assert "no space left on the device while writing" in message and "previous checkpoint ckpt.pt is intact" in message
    assert (disk / "run" / "ckpt.pt").read_bytes() == before


def test_full_disk_during_generation(tmp_path, small_disk, tiny_ckpt):
    disk = small_disk(1024)
    fill_disk(disk, leave_kib=8)
    with pytest.raises(SystemExit) as e:
        generate.main(["--ckpt", str(tiny_ckpt), "--prompt=x", "--out", str(disk), "--seconds=2", "--format=wav"])
    assert "no space left on the device while writing" in one_line(e)


# -----------------------------------------------------------------------------
# settings at their edges

@pytest.mark.parametrize("script,args,message", [
    (compress, ["--clip_seconds=0"], r"clip_seconds=0 must be between 1 and 600"),
    (compress, ["--batch_size=-3"], r"batch_size=-3 must be between 1 and 4096"),
    (compress, ["--bandwidth=inf"], r"--bandwidth takes a finite number"),
    (compress, ["--min_seconds=-1"], r"min_seconds=-1 must be between 0"),
    (compress, ["--num_workers=100000"], r"num_workers=100000 must be between 0 and 256"),
    (deploy, ["--lr=nan"], r"--lr takes a finite number, not 'nan'"),
    (deploy, ["--lr=0"], r"lr=0.0 is out of range: it must be in \(0, inf\)"),
    (deploy, ["--lr=fast"], r"--lr takes a number, not .fast."),
    (deploy, ["--dropout=1"], r"dropout=1.0 is out of range: it must be in \[0, 1\)"),
    (deploy, ["--batch_size=0"], r"batch_size=0 is out of range"),
    (deploy, ["--dim=1000000000"], r"dim=1000000000 is out of range"),
    (deploy, ["--seq_len=1"], r"seq_len=1 is out of range"),
    (deploy, ["--val_fraction=1"], r"val_fraction=1.0 is out of range"),
    (deploy, ["--sample_seconds=0"], r"sample_seconds=0.0 is out of range"),
    (deploy, ["--eval_interval=0"], r"eval_interval=0 is out of range"),
    (deploy, ["--max_steps=-5"], r"max_steps=-5 is out of range"),
    (example, ["--steps=0"], r"steps=0 is out of range"),
    (example, ["--seconds=-1"], r"seconds=-1.0 is out of range"),
])
def test_numeric_settings_at_their_edges(script, args, message, tmp_path):
    base = {compress: ["--input", str(music(tmp_path / "m", n=1)), "--output", str(tmp_path / "o"), *FAST],
            deploy: ["--data", str(write_shards(tmp_path / "data", clips=2)), "--out", str(tmp_path / "r"), *TINY_TRAIN],
            example: ["--out", str(tmp_path / "ex")]}[script]
    with pytest.raises(SystemExit, match=message) as e:
        script.main(base + args)
    one_line(e)
    assert not os.path.exists(tmp_path / "r" / "ckpt.pt")


# -----------------------------------------------------------------------------
# files that are not what they claim

class Payload:
    """A pickle that runs code when loaded: it must never be loaded."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_code_is_never_loaded_and_the_message_is_plain(tmp_path, tiny_ckpt):
    marker = str(tmp_path / "code_ran")
    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(marker)}, evil)
    with pytest.raises(SystemExit) as e:
        generate.main(["--ckpt", str(evil), "--prompt=x", "--out", str(tmp_path / "o")])
    message = one_line(e)
    assert "is not a checkpoint written by this project's deploy.py" in message
    assert "weights_only" not in message and "\x1b" not in message
    with pytest.raises(SystemExit) as e:
        codec.load_codec("pretrained", str(evil), 0, 6.0, "cpu")
    assert "it is not a file of plain tensors" in one_line(e) and "weights_only" not in one_line(e)
    assert not os.path.exists(marker)


def test_a_long_prompt_is_cut_and_said_once(capsys):
    import model as M
    enc = checkpoint.TextEncoder()
    enc(["calm " * 100, "piano " * 90])
    enc(["drums " * 120])
    out = capsys.readouterr().out
    assert out.count("longer than the text encoder's limit of 64 tokens") == 1


# -----------------------------------------------------------------------------
# a GPU that the system shows but torch cannot use

def test_visible_gpu_that_torch_cannot_use_stops_auto(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("torch can use the GPU here: nothing to refuse")
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 550.54.15\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SystemExit) as e:
        compress.main(["--input", str(music(tmp_path / "m", n=1)), "--output", str(tmp_path / "o"), "--codec=untrained"])
    message = one_line(e)
    assert "an NVIDIA GPU is visible (driver 550.54.15)" in message and f"torch {torch.__version__}" in message
    assert "update the NVIDIA driver" in message and "PyTorch's wheel index" in message and "--device=cpu" in message
    if torch.version.cuda:
        assert f"built for CUDA {torch.version.cuda}" in message
    assert not os.path.exists(tmp_path / "o")                 # stopped before any work
    assert common.pick_device("cpu") == "cpu"                  # on purpose: still runs
    monkeypatch.setenv("PATH", "/nonexistent")
    if not os.path.exists("/dev/nvidia0"):
        assert common.pick_device("auto") == "cpu"             # no GPU at all: the CPU, quietly


def test_example_only_deletes_what_it_made(tmp_path):
    mine = tmp_path / "my_project"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(SystemExit, match="already exists and was not made by example.py") as e:
        example.main([f"--out={mine}"])
    one_line(e)
    assert (mine / "thesis.tex").read_text() == "years of work"
    out = tmp_path / "ex"
    folders = [str(out / d) for d in ("music", "data", "run", "samples")]
    example.start_fresh(str(out), folders)
    for d in folders:
        os.makedirs(d)
    (out / "run" / "old.txt").write_text("from the last example run")
    (out / "notes.txt").write_text("the user's")
    example.start_fresh(str(out), folders)          # a second run: replaces its own folders only
    assert not (out / "run").exists() and (out / "notes.txt").read_text() == "the user's"


def test_checkpoints_shards_exports_and_the_index_reach_the_disk_before_their_names(tmp_path, monkeypatch, tiny_ckpt):
    """A power cut cannot leave an empty file under a finished name: each is fsynced before the rename that makes it
    visible, and its folder after."""
    synced, real = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)

    def before_and_after(name, folder):
        tmp = next(i for i, p in enumerate(synced) if os.path.basename(p).startswith(name + ".tmp"))
        assert str(folder) in synced[tmp + 1:], (name, synced)
    checkpoint.save_checkpoint(str(tmp_path / "ckpt.pt"), dict(step=1))
    before_and_after("ckpt.pt", tmp_path)
    export.main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "model")])
    before_and_after("model.safetensors", tmp_path / "model")
    before_and_after("config.json", tmp_path / "model")
    compress.main(["--input", str(music(tmp_path / "m", n=1)), "--output", str(tmp_path / "data"), *FAST])
    before_and_after("shard-r000-00000.h5", tmp_path / "data")
    before_and_after("index.json", tmp_path / "data")


def test_a_file_cut_short_is_called_damaged_not_foreign(tmp_path, tiny_ckpt):
    """An interrupted copy of a checkpoint or an export says "damaged or incomplete: copy it again", not "not a file of
    this project"."""
    cut = tmp_path / "ckpt.pt"
    data = tiny_ckpt.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(SystemExit) as e:
        checkpoint.load_checkpoint(str(cut))
    assert "is damaged or incomplete" in one_line(e) and "copy it again" in one_line(e)
    export.main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "model")])
    for name in ("model.safetensors", "config.json"):
        path = tmp_path / "model" / name
        whole = path.read_bytes()
        path.write_bytes(whole[:len(whole) // 2])
        with pytest.raises(SystemExit) as e:
            checkpoint.load_model(str(tmp_path / "model"))
        assert f"{name} is damaged or incomplete" in one_line(e) and "again" in one_line(e)
        path.write_bytes(whole)
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit) as e:
        checkpoint.load_checkpoint(str(tmp_path / "other.pt"))
    assert "is not a checkpoint written by this project" in one_line(e)
