"""deploy.py + train.py: training, exact resume, checkpoints, DDP, and clear errors."""
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import deploy
import train
from conftest import ROOT, TINY_TRAIN, write_shards


def run(data, out, *extra):
    return deploy.main(["--data", str(data), "--out", str(out), *TINY_TRAIN, *extra])


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_tiny_model_overfits_a_few_clips(tmp_path):
    data = write_shards(tmp_path / "data", clips=4, steps=300)
    run(data, tmp_path / "run", "--max_steps=80", "--eval_interval=40", "--val_fraction=0", "--cond_dropout=0",
        "--dropout=0", "--lr=1e-2", "--warmup_steps=5")
    losses = [r["loss"] for r in metrics(tmp_path / "run") if "loss" in r]
    unigram_entropy = math.log(32)            # codes are spread evenly over 32 values
    assert losses[0] > 0.9 * unigram_entropy
    assert np.mean(losses[-5:]) < 0.4 * unigram_entropy
    assert os.path.exists(tmp_path / "run" / "loss.png")


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    data = write_shards(tmp_path / "data")
    common = ["--eval_interval=4", "--lr_decay_steps=8", "--cond_dropout=0.5", "--feature_redraw_interval=3", "--dropout=0.1"]
    run(data, tmp_path / "a", "--max_steps=8", *common)
    run(data, tmp_path / "b", "--max_steps=4", *common)
    deploy.main(["--out", str(tmp_path / "b"), "--data", str(data), "--resume", "--max_steps=8"])
    a = [(r["step"], r["loss"], r["grad_norm"]) for r in metrics(tmp_path / "a") if "loss" in r]
    b = [(r["step"], r["loss"], r["grad_norm"]) for r in metrics(tmp_path / "b") if "loss" in r]
    assert [s for s, *_ in a] == list(range(1, 9)) and a == b
    ca, cb = (torch.load(p / "ckpt.pt", weights_only=True) for p in (tmp_path / "a", tmp_path / "b"))
    assert ca["step"] == cb["step"] == 8
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])


def test_checkpoint_loads_weights_only_and_survives_a_crash_mid_write(tmp_path, monkeypatch):
    data = write_shards(tmp_path / "data")
    run(data, tmp_path / "run", "--max_steps=2", "--eval_interval=2")
    path = tmp_path / "run" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)      # no pickled classes
    assert ckpt["step"] == 2 and ckpt["config"]["dim"] == 32 and ckpt["model_config"]["depth"] == 1
    assert {"model", "optimizer", "best_val_loss", "rng", "data_position", "data"} <= ckpt.keys()
    before = path.read_bytes()

    def dying_save(obj, f):                         # the process dies half-way through writing
        f.write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(str(path), _model_of(ckpt), torch.optim.AdamW([torch.zeros(1, requires_grad=True)]),
                              3, 1.0, ckpt["config"], ckpt["data"], [train.rng_state("cpu")])
    assert path.read_bytes() == before and torch.load(path, weights_only=True)["step"] == 2
    assert [p for p in os.listdir(tmp_path / "run") if ".tmp" in p] == []


def _model_of(ckpt):
    import model as M
    net = M.MusicTransformer(M.ModelConfig.from_dict(ckpt["model_config"]))
    net.load_state_dict(ckpt["model"])
    return net


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    data = write_shards(tmp_path / "data")
    cmd = [sys.executable, "deploy.py", "--data", str(data), "--out", str(tmp_path / "run"), *TINY_TRAIN,
           "--max_steps=100000", "--eval_interval=100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:                         # wait until it is training
        if line.startswith("step 3:"):
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, rest
    assert "stopped by signal" in rest and "--resume" in rest
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] >= 3


def test_ddp_two_processes_on_cpu(tmp_path):
    data = write_shards(tmp_path / "data")
    script = tmp_path / "ddp_check.py"
    script.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import deploy\n"
        "net = deploy.main(sys.argv[1:])\n"
        "flat = torch.cat([p.detach().flatten() for p in net.parameters()] + [b.flatten() for n, b in net.named_buffers()])\n"
        "torch.save(flat, os.path.join(os.environ['CHECK_DIR'], f\"rank{os.environ['RANK']}.pt\"))\n")
    env = dict(os.environ, CHECK_DIR=str(tmp_path), OMP_NUM_THREADS="1")

    def torchrun(out, *extra):
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 str(script), "--data", str(data), "--out", str(out), *TINY_TRAIN, "--eval_interval=3",
                                 "--feature_redraw_interval=2", "--grad_accum=2", "--lr_decay_steps=6", *extra],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    out = tmp_path / "run"
    stdout = torchrun(out, "--max_steps=6")
    assert "effective batch = 4 clips × 2 accumulation × 2 processes = 16 clips" in stdout
    assert stdout.count("saved") == 2                              # only rank 0 writes (steps 3 and 6)
    assert sorted(os.listdir(out)) == ["ckpt.pt", "loss.png", "metrics.jsonl"]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(r0, r1)                                    # identical weights and random features
    uninterrupted = torch.load(out / "ckpt.pt", weights_only=True)
    assert uninterrupted["step"] == 6 and len(uninterrupted["rng"]) == 2   # each rank's random state
    # stopped at step 3 and resumed: the same weights as the uninterrupted run
    torchrun(tmp_path / "run2", "--max_steps=3")
    torchrun(tmp_path / "run2", "--max_steps=6", "--resume")
    resumed = torch.load(tmp_path / "run2" / "ckpt.pt", weights_only=True)
    assert all(torch.equal(resumed["model"][k], uninterrupted["model"][k]) for k in resumed["model"])


def test_bad_inputs_give_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .h5 shards in --data=.*run compress.py first"):
        run(tmp_path / "empty", tmp_path / "r")
    mixed = write_shards(tmp_path / "mixed", rank=0)
    write_shards(tmp_path / "mixed", rank=1, codec="encodec_48khz")
    with pytest.raises(SystemExit, match="shards disagree: .* has codec=encodec_48khz"):
        run(mixed, tmp_path / "r")
    data = write_shards(tmp_path / "data")
    with pytest.raises(SystemExit, match="seq_len=9000 is longer than the model's max_len=600"):
        run(data, tmp_path / "r", "--seq_len=9000")
    with pytest.raises(SystemExit, match="no checkpoint at"):
        run(data, tmp_path / "nothing", "--resume")
    run(data, tmp_path / "r", "--max_steps=1", "--eval_interval=1")
    with pytest.raises(SystemExit, match="already holds a run .*add --resume to continue it, or choose another --out"):
        run(data, tmp_path / "r", "--max_steps=1")
    with pytest.raises(SystemExit, match="cannot change dim when resuming: the checkpoint's model has dim=32"):
        deploy.main(["--data", str(data), "--out", str(tmp_path / "r"), "--resume", "--dim=64"])
    with pytest.raises(SystemExit, match="unknown setting --learning_rate"):
        run(data, tmp_path / "r", "--learning_rate=1")
    with pytest.raises(SystemExit, match="kernel='relu': use generalized or softmax"):
        run(data, tmp_path / "r2", "--kernel=relu")
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(SystemExit, match="tensorboard=True needs the tensorboard package"):
            run(data, tmp_path / "r3", "--tensorboard")


def test_divergence_skips_updates_then_stops_with_a_message(tmp_path):
    data = write_shards(tmp_path / "data")
    with pytest.raises(SystemExit, match="non-finite steps in a row .* resume with a lower --lr"):
        run(data, tmp_path / "r", "--max_steps=50", "--eval_interval=1", "--lr=1e20", "--warmup_steps=0",
            "--max_bad_steps=3", "--grad_clip=0")
    assert torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["step"] >= 1   # the last good one stays


def test_padding_beyond_a_clip_is_read_as_unknown_and_not_scored(tmp_path):
    import model as M
    shards = deploy.Shards(str(write_shards(tmp_path / "data", clips=3, steps=300)))
    assert shards.lengths[0] == 260                         # clip 0 is shorter than the array
    codes = shards.read(0, 200, 100)
    assert (codes[:, :60] >= 0).all() and (codes[:, 60:] == M.UNKNOWN).all()
    targets = torch.from_numpy(codes)[None]
    logits = torch.randn(1, 4, 100, 1024)
    loss, per = M.codebook_loss(logits, targets)
    valid_only, _ = M.codebook_loss(logits[:, :, :60], targets[:, :, :60])
    assert torch.allclose(loss, valid_only)
    tokens = M.inputs_from_targets(targets, 1024)
    assert tokens[0, 0, 0] == 1024 and (tokens[0, :, 61:] == 1024).all()   # start token first; padding read as start


def test_leftovers_of_killed_writes_never_block_or_pile_up(tmp_path):
    """Temporary checkpoint files of killed writes are removed at start; a metrics line cut off by a
    crash does not stop a resume."""
    data = write_shards(tmp_path / "data")
    run(data, tmp_path / "run", "--max_steps=2", "--eval_interval=2")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "run" / f"ckpt.pt.tmp{dead.pid}"
    stale.write_bytes(b"x" * 1000)
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    live = tmp_path / "run" / f"ckpt.pt.tmp{writer.pid}"        # another process's write in progress: left alone
    live.write_bytes(b"y")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')                        # the crash cut this line
    deploy.main(["--data", str(data), "--out", str(tmp_path / "run"), "--resume", "--max_steps=4"])
    writer.kill()
    assert not stale.exists() and live.exists()
    steps = [r["step"] for r in metrics(tmp_path / "run") if "loss" in r]
    assert steps == [1, 2, 3, 4]


def test_resume_hint_repeats_the_launch_command(monkeypatch):
    argv = ["--data=data/", "--out=runs/x", "--resume"]
    assert deploy.resume_command(argv) == "python deploy.py --data=data/ --out=runs/x --resume"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    parent = ["/venv/bin/python3", "/venv/bin/torchrun", "--standalone", "--nproc_per_node=2", "deploy.py", "--data=data/"]
    assert deploy.resume_command(argv[:2], parent) == \
        "torchrun --standalone --nproc_per_node=2 deploy.py --data=data/ --out=runs/x --resume"
    parent = ["/usr/bin/python3.11", "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "/src/deploy.py"]
    assert deploy.resume_command(argv[:2], parent) == \
        "python -m torch.distributed.run --nnodes=1 --nproc_per_node=2 /src/deploy.py --data=data/ --out=runs/x --resume"
