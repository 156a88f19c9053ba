"""generate.py: prompt → MP3 through the model's recurrent state."""
import json
import os
import numpy as np
import pytest
import soundfile as sf
import torch

import audio
import bench
import checkpoint
import codec
import decoding
import deploy
import example
import generate
import model as M
from conftest import TINY_TRAIN, write_shards


@pytest.fixture
def ckpt(tiny_ckpt):
    return tiny_ckpt


def gen(ckpt, out, *extra):
    return generate.main(["--ckpt", str(ckpt), "--out", str(out), *extra])


def test_mp3_per_prompt_with_complete_json(ckpt, tmp_path):
    assert gen(ckpt, tmp_path, "--prompt", "calm minor pad", "--prompt=upbeat major arpeggio", "--seconds=2",
               "--spectrogram") == 0
    for name in ("calm_minor_pad", "upbeat_major_arpeggio"):
        sound, sr = sf.read(tmp_path / f"{name}.mp3")
        assert sr == 48_000 and sound.ndim == 2 and sound.shape[1] == 2
        assert abs(len(sound) - 2 * sr) <= 1152                           # 2 s, to an MP3 frame
        meta = json.loads((tmp_path / f"{name}.mp3.json").read_text())
        for key in ("prompt", "seed", "top_k", "top_p", "temperature", "cfg", "ckpt", "codec", "seconds", "codes"):
            assert key in meta
        assert meta["codec"] == "untrained:seed=0" and meta["cfg"] == 2.0 and meta["top_k"] == 0      # the defaults
        assert np.array(meta["codes"]).shape == (4, 303) and meta["seconds"] == 2.0 and meta["samples"] == 96_000
        assert (tmp_path / f"{name}.mp3.png").exists()


def test_same_seed_same_codes_other_seed_differs(ckpt, tmp_path):
    codes = {}
    for run, seed, path in (("a", 1, ckpt), ("b", 1, ckpt.parent), ("c", 2, ckpt)):    # b: the run folder names its ckpt.pt
        gen(path, tmp_path / run, "--prompt=calm minor pad", "--seconds=1", f"--seed={seed}", "--format=wav")
        codes[run] = json.loads((tmp_path / run / "calm_minor_pad.wav.json").read_text())["codes"]
    assert codes["a"] == codes["b"] and codes["a"] != codes["c"]
    sound, sr = sf.read(tmp_path / "a" / "calm_minor_pad.wav")
    assert sr == 48_000 and sound.shape[1] == 2


def stub_text_encoder(texts, device):
    g = torch.Generator().manual_seed(0)
    table = {t: torch.randn(3, 24, generator=g) for t in sorted(set(texts))}
    return torch.stack([table[t] for t in texts]), torch.ones(len(texts), 3, dtype=torch.bool)


def open_tiny(pattern, **overrides):
    torch.manual_seed(0)
    cfg = M.ModelConfig(**dict(dict(dim=64, depth=2, heads=4, dim_head=16, nb_features=32, local_window=7, text_dim=24,
                                    dropout=0.0, chunk_size=16, pattern=pattern), **overrides))
    net = M.MusicTransformer(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 0:
                p.fill_(0.5)
    return net


def fast_tiny(pattern, device="cpu", **overrides):
    """open_tiny's decoding copy (decoding.for_decoding, fp32): what a compiled step or a CUDA graph runs."""
    return decoding.for_decoding(open_tiny(pattern, **overrides), device, torch.float32)


@pytest.mark.parametrize("pattern", ["parallel", "delay"])
def test_recurrent_sampling_equals_refeeding(pattern):
    net = open_tiny(pattern)
    kwargs = dict(steps=40, device="cpu", seed=3, top_k=50, cfg=2.0)
    fast = decoding.sample(net, stub_text_encoder, ["a", "b"], **kwargs)
    slow = decoding.sample(net, stub_text_encoder, ["a", "b"], refeed=True, **kwargs)
    assert torch.equal(fast, slow)


def fast_tiny(pattern, device="cpu", **overrides):
    """open_tiny's decoding copy (decoding.for_decoding, fp32): what a compiled step or a CUDA graph runs."""
    return decoding.for_decoding(open_tiny(pattern, **overrides), device, torch.float32)


@pytest.mark.parametrize("pattern", ["parallel", "delay"])
def test_start_token_is_never_generated(pattern):
    net = open_tiny(pattern)
    with torch.no_grad():
        net.head.bias.view(4, 1024)[:, 1000:] += 50.0     # push mass to the top of the vocabulary
    codes = decoding.sample(net, stub_text_encoder, ["a"] * 16, steps=60, device="cpu", top_k=1024, temperature=2.0)
    assert codes.shape == (16, 4, 60) and codes.min() >= 0 and codes.max() <= 1023


def fast_tiny(pattern, device="cpu", **overrides):
    """open_tiny's decoding copy (decoding.for_decoding, fp32): what a compiled step or a CUDA graph runs."""
    return decoding.for_decoding(open_tiny(pattern, **overrides), device, torch.float32)


@pytest.mark.parametrize("pattern", ["parallel", "delay"])
def test_continuation_keeps_the_prompt_codes(pattern):
    net = open_tiny(pattern)
    prompt = torch.randint(0, 1024, (4, 25))
    codes = decoding.sample(net, stub_text_encoder, ["a", "b"], steps=50, device="cpu", prompt_codes=prompt)
    assert torch.equal(codes[:, :, :25], prompt.expand(2, 4, 25)) and not torch.equal(codes[0, :, 25:], codes[1, :, 25:])


def test_continue_from_audio_file(ckpt, tmp_path):
    sf.write(tmp_path / "intro.wav", example.synth_clip(seconds=1.2), 48_000)
    gen(ckpt, tmp_path / "o", "--prompt=calm minor pad", "--seconds=2.5", f"--continue_from={tmp_path / 'intro.wav'}")
    codes = np.array(json.loads((tmp_path / "o" / "calm_minor_pad.mp3.json").read_text())["codes"])
    encodec = codec.load_codec("untrained", "", 0, 6.0, "cpu")
    wav = audio.load_audio(str(tmp_path / "intro.wav"))[None, :, :48_000]
    [(intro, _)] = codec.encode_clips(encodec, [wav[0]])
    assert codes.shape == (4, codec.steps_for(2.5)[0]) and np.array_equal(codes[:, :150], intro.numpy())


def counted(read, frames):
    def reading(self, *args, **kwargs):
        block = read(self, *args, **kwargs)
        frames.append(len(block))
        return block
    return reading


def test_a_continuation_reads_only_the_end_it_uses(tmp_path, monkeypatch):
    """The last window of a long prompt file is read after a seek (soundfile) or ffmpeg's seek from the end (MP3 and
    the rest), not decoded from the start; what comes back is the end of the file, as reading it whole gives."""
    import subprocess
    import soundfile
    sound = np.concatenate([example.synth_clip(kind, seconds=20, sr=44_100, seed=i) for i, kind in enumerate(example.KINDS)])
    sf.write(tmp_path / "long.flac", sound, 44_100)
    subprocess.run([audio.ffmpeg_exe(), "-v", "error", "-i", str(tmp_path / "long.flac"), "-b:a", "128k", str(tmp_path / "long.mp3")],
                   check=True)
    frames, commands = [], []
    read, popen = soundfile.SoundFile.read, subprocess.Popen
    monkeypatch.setattr(soundfile.SoundFile, "read", counted(read, frames))
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, *a, **kw: commands.append(cmd) or popen(cmd, *a, **kw))
    for name in ("long.flac", "long.mp3"):
        tail = audio.load_audio(str(tmp_path / name), last_seconds=10)
        monkeypatch.undo()
        whole = audio.load_audio(str(tmp_path / name))
        assert tail.shape == (2, 480_000) and torch.allclose(tail, whole[:, -480_000:], atol=1e-5)
        monkeypatch.setattr(soundfile.SoundFile, "read", counted(read, frames))
        monkeypatch.setattr(subprocess, "Popen", lambda cmd, *a, **kw: commands.append(cmd) or popen(cmd, *a, **kw))
    assert 10 * 44_100 < sum(frames) <= 11 * 44_100 + 1    # the last 11 s (a second of the resampler's context), not 60 s
    assert any("-sseof" in cmd for cmd in commands)


def test_bad_inputs_fail_before_any_model_work(ckpt, tmp_path, monkeypatch):
    (tmp_path / "junk.pt").write_bytes(os.urandom(256))
    sf.write(tmp_path / "short.wav", np.zeros((24_000, 2)), 48_000)
    cases = [
        ([], "no prompt"),
        (["--prompt=x", "--seconds=0"], r"seconds=0.0 is out of range: it must be in \(0, 36000\]"),
        (["--prompt=x", "--seconds=0.001"], "shorter than one codec step"),
        (["--prompt=x", "--seconds=nan"], "--seconds takes a finite number, not 'nan'"),
        (["--prompt=x", "--top_k=-1"], r"top_k=-1 is out of range: it must be a whole number in \[0, 1024\] \(0: off\)"),
        (["--prompt=x", "--top_k=2000"], r"top_k=2000 is out of range"),
        (["--prompt=x", "--top_k=2.5"], r"top_k=2.5 is out of range: it must be a whole number"),
        (["--prompt=x", "--top_p=0"], r"top_p=0 is out of range: it must be in \(0, 1\] \(or auto"),
        (["--prompt=x", "--top_p=1.5"], r"top_p=1.5 is out of range"),
        (["--prompt=x", "--temperature=-1"], r"temperature=-1 is out of range"),
        (["--prompt=x", "--temperature=hot"], r"temperature='hot' is not a number \(or auto"),
        (["--prompt=x", "--num_samples=0"], r"num_samples=0 is out of range"),
        (["--prompt=x", "--cfg=0.5"], r"cfg=0.5 is out of range: it must be in \[1, 100\]"),
        ([f"--prompt={'x' * 800}"], "prompt 1 is 800 characters long: a prompt may have up to 500"),
        (["--prompt=x", f"--continue_from={tmp_path / 'nope.wav'}"], "cannot read --continue_from=.*: no such file"),
        (["--prompt=x", f"--continue_from={tmp_path / 'junk.pt'}"], "cannot read --continue_from=.* as audio"),
        (["--prompt=x", f"--continue_from={tmp_path / 'short.wav'}"], "holds 0.50 s of audio: give at least 1 s"),
        (["--prompt=x", "--format=ogg"], "format='ogg': use mp3 or wav"),
        (["--prompt=x", "--sample_rate=3"], "unknown setting --sample_rate"),
    ]
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "load_model", lambda *a, **k: pytest.fail("the checkpoint was loaded before the inputs were checked"))
        for args, message in cases:
            with pytest.raises(SystemExit, match=message):
                gen(ckpt, tmp_path / "o", *args)
    with pytest.raises(SystemExit, match="is not a checkpoint written by this project.s deploy.py"):
        generate.main(["--ckpt", str(tmp_path / "junk.pt"), "--prompt=x"])
    with pytest.raises(SystemExit, match="no model at --ckpt=.*missing.pt: give a run folder"):
        generate.main(["--ckpt", str(tmp_path / "missing.pt"), "--prompt=x"])
    assert not (tmp_path / "o").exists()


def test_guidance_needs_unconditional_training(tmp_path):
    data = write_shards(tmp_path / "data")
    deploy.main(["--data", str(data), "--out", str(tmp_path / "run"), *TINY_TRAIN, "--max_steps=1", "--eval_interval=1",
                 "--cond_dropout=0"])
    with pytest.raises(SystemExit, match="trained with cond_dropout=0.*guidance \\(cfg\\) must be 1"):
        gen(tmp_path / "run" / "ckpt.pt", tmp_path / "o", "--prompt=x", "--seconds=1", "--cfg=3")
    assert gen(tmp_path / "run" / "ckpt.pt", tmp_path / "o", "--prompt=x", "--seconds=1") == 0        # auto: no guidance
    assert json.loads((tmp_path / "o" / "x.mp3.json").read_text())["cfg"] == 1.0


def test_checkpoint_whose_weights_do_not_match_its_settings(ckpt, tmp_path):
    bad = torch.load(ckpt, weights_only=True)
    bad["model_config"]["dim"] = 48
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(SystemExit, match="the weights do not match the model settings"):
        generate.main(["--ckpt", str(tmp_path / "bad.pt"), "--prompt=x", "--seconds=1", "--out", str(tmp_path)])


def test_earlier_pieces_are_never_replaced_without_overwrite(ckpt, tmp_path):
    for seed in (1, 2):
        assert gen(ckpt, tmp_path, "--prompt=calm minor pad", "--seconds=1", f"--seed={seed}", "--format=wav") == 0
    assert gen(ckpt, tmp_path, "--prompt=Calm, minor pad!", "--seconds=1", "--seed=3", "--format=wav") == 0   # slugs alike
    seeds = {f: json.loads((tmp_path / f"{f}.json").read_text())["seed"]
             for f in ("calm_minor_pad.wav", "calm_minor_pad_1.wav", "calm_minor_pad_2.wav")}
    assert seeds == {"calm_minor_pad.wav": 1, "calm_minor_pad_1.wav": 2, "calm_minor_pad_2.wav": 3}
    assert gen(ckpt, tmp_path, "--prompt=calm minor pad", "--seconds=1", "--seed=4", "--format=wav", "--overwrite") == 0
    assert json.loads((tmp_path / "calm_minor_pad.wav.json").read_text())["seed"] == 4
    assert not [f for f in os.listdir(tmp_path) if "partial" in f or ".tmp" in f]


# -----------------------------------------------------------------------------
# any length, heard while it is made

@pytest.mark.parametrize("positions", ["absolute", "relative"])
def test_a_decode_step_costs_the_same_at_any_position(positions):
    net = open_tiny("delay")
    net.cfg.positions = positions
    text, mask = stub_text_encoder(["a", "b"], "cpu")
    state = net.init_state(2, "cpu")
    tokens = torch.randint(0, 1024, (2, 4, 5))
    net.prefill(tokens, text, mask, state)
    shapes = [t.shape for t in decoding._state_tensors(state)]
    cost = []
    for t in range(600):
        if t in (3, 599):
            cost.append(bench.count_ops(lambda: net.step(tokens[..., 0], state)))
        else:
            net.step(tokens[..., 0], state)
    assert cost[0] == cost[1]
    assert [t.shape for t in decoding._state_tensors(state)] == shapes      # no state tensor grew
    assert int(state["pos"]) == 605


def test_a_guided_decode_step_is_few_operations():
    """A CUDA graph replays one kernel per operation, and on a GPU a step is bound by their number
    (BENCHMARKS.md). The default model's step with the sampler, at batch 2 (guidance) in bf16 weights as
    generate.py decodes on a GPU: 373 operations (views apart) before the ones this guards were removed."""
    torch.manual_seed(0)
    net = bench.decoding_copy(bench.our_model(dict(dropout=0.0, positions="relative"), "cpu").eval(), torch.bfloat16, "cpu")
    decoder = decoding.Decoder(net, 2, "cpu", top_k=250, cfg=3.0)
    tokens = torch.randint(0, 1024, (2, 4, 8))
    decoder.prefill(tokens, *bench.random_text(["a", ""], "cpu"))
    slot, noise = torch.full((1, 4), M.UNKNOWN), torch.empty(1, 4, 1024).exponential_()
    ops, _ = bench.count_ops(lambda: decoder.advance(tokens[:1, :, 0], slot, noise))
    assert ops <= 295, ops


@pytest.mark.parametrize("positions,pattern", [("absolute", "delay"), ("relative", "parallel"), ("absolute", "parallel")])
def test_long_pieces_equal_refeeding_across_windows(positions, pattern):
    """130 steps with max_len 40: windows (absolute positions: each re-prefilled with its last 16 steps)
    or a state that carries on (relative). The recurrent sampler equals one that runs forward() on the
    whole current window at every step, so a window after a boundary equals a fresh prefill of it."""
    net = open_tiny(pattern)
    net.cfg.positions, net.cfg.max_len = positions, 40
    kwargs = dict(steps=130, device="cpu", seed=5, top_k=100, top_p=0.95, temperature=0.9, cfg=2.0, stride=24)
    fast = decoding.sample(net, stub_text_encoder, ["a", "b"], **kwargs)
    slow = decoding.sample(net, stub_text_encoder, ["a", "b"], refeed=True, **kwargs)
    assert torch.equal(fast, slow) and (fast >= 0).all()
    prompt = torch.randint(0, 1024, (4, 70))                     # a continuation longer than the window
    fast = decoding.sample(net, stub_text_encoder, ["a", "b"], prompt_codes=prompt, **kwargs)
    slow = decoding.sample(net, stub_text_encoder, ["a", "b"], prompt_codes=prompt, refeed=True, **kwargs)
    assert torch.equal(fast, slow) and torch.equal(fast[:, :, :70], prompt.expand(2, 4, 70))


def test_streamed_decoding_equals_decoding_at_once():
    encodec = codec.load_codec("untrained", "", 0, 6.0, "cpu")
    g = torch.Generator().manual_seed(0)
    for steps in (150, 449, 450, 452, 749):     # (the package cannot decode a last segment of 1 step; ours can)
        codes = torch.randint(0, 1024, (2, 4, steps), generator=g)
        scales = torch.rand(2, -(-steps // 150), generator=g) * 0.2 + 0.01
        with torch.no_grad():
            whole = encodec.decode([(codes[..., i:i + 150], scales[:, j:j + 1]) for j, i in enumerate(range(0, steps, 150))])
            stream = codec.SegmentStream(encodec)
            parts = [stream.push(codes[..., i:i + 150], scales[:, j]) for j, i in enumerate(range(0, steps, 150))]
            parts.append(stream.finish())
        assert torch.equal(torch.cat([p for p in parts if p.numel()], -1), whole)


def test_generate_py_streams_a_long_piece_with_every_option(ckpt, tmp_path):
    """10 s from a model built for 4 s (windows), two prompts × two samples, top-k, top-p, temperature,
    guidance, and a continuation from a 6 s file (longer than the window: its last 4 s are the context).
    The WAV written as it was made equals decoding the stored codes at once."""
    sf.write(tmp_path / "intro.wav", example.synth_clip(seconds=6.2), 48_000)
    args = ["--prompt=calm minor pad", "--prompt=upbeat major arpeggio", "--num_samples=2", "--seconds=10", "--top_k=100",
            "--top_p=0.9", "--temperature=0.8", "--cfg=2", "--window_stride=3", "--format=wav", "--seed=7",
            f"--continue_from={tmp_path / 'intro.wav'}"]
    assert gen(ckpt, tmp_path / "a", *args) == 0
    files = sorted(f for f in os.listdir(tmp_path / "a") if f.endswith(".wav"))
    assert files == ["calm_minor_pad_0.wav", "calm_minor_pad_1.wav", "upbeat_major_arpeggio_0.wav", "upbeat_major_arpeggio_1.wav"]
    encodec = codec.load_codec("untrained", "", 0, 6.0, "cpu")
    intro = audio.load_audio(str(tmp_path / "intro.wav"), last_seconds=4)
    [(intro_codes, _)] = codec.encode_clips(encodec, [intro[:, :codec.clip_samples(3)]])
    metas = {f: json.loads((tmp_path / "a" / f"{f}.json").read_text()) for f in files}
    batch = torch.stack([torch.tensor(m["codes"]) for m in sorted(metas.values(), key=lambda m: m["batch_index"])])
    with torch.no_grad():          # the package's own decode of all the codes at once, the batch as generate.py made it
        whole = encodec.decode([(batch[..., i:i + 150], torch.full((4, 1), metas[files[0]]["scale"])) for i in range(0, 1515, 150)])
    for f, meta in metas.items():
        codes = torch.tensor(meta["codes"])
        assert codes.shape == (4, 1515) and meta["top_p"] == 0.9 and meta["cfg"] == 2.0   # 10 s: 1515 steps decode to 480000 samples
        assert torch.equal(codes[:, :450], intro_codes)
        written, sr = sf.read(tmp_path / "a" / f, dtype="int16")
        expected = (whole[meta["batch_index"]].clamp(-1, 1).numpy().T * 32767).astype(np.int16)
        assert sr == 48_000 and len(written) == 480_000 and np.array_equal(written, expected)
    texts = {json.loads((tmp_path / "a" / f"{f}.json").read_text())["prompt"] for f in files}
    assert texts == {"calm minor pad", "upbeat major arpeggio"}


def test_an_interrupted_piece_is_kept_under_a_name_that_says_so(ckpt, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    (tmp_path / "x.wav").write_bytes(b"an earlier piece")
    proc = subprocess.Popen([sys.executable, "generate.py", "--ckpt", str(ckpt), "--prompt=x", "--seconds=600",
                             "--format=wav", "--out", str(tmp_path), "--device=cpu"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "x.partial.wav"
    deadline = time.time() + 120
    while time.time() < deadline and not (partial.exists() and partial.stat().st_size > 1000):   # its first second is out
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)                      # as Ctrl-C: one line that says what is kept, status 130
    last_words = proc.communicate(timeout=60)[1].strip().splitlines()[-1]
    assert proc.returncode == 130 and last_words == f"stopped: the audio made so far is kept in {partial}"
    assert (tmp_path / "x.wav").read_bytes() == b"an earlier piece"
    assert sorted(os.listdir(tmp_path)) == ["x.partial.wav", "x.wav"]          # no .json: nothing looks finished
    sound, sr = sf.read(partial)                                               # what was made can be listened to
    assert sr == 48_000 and len(sound) >= codec.SEGMENT_STRIDE           # at least its first second


def test_a_piece_stopped_before_its_first_second_leaves_no_file(ckpt, tmp_path, monkeypatch, capsys):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
        yield
    monkeypatch.setattr(decoding, "generate", ctrl_c)
    with pytest.raises(SystemExit) as stop:
        gen(ckpt, tmp_path, "--prompt=x", "--prompt=y", "--seconds=5")
    assert stop.value.code == 130 and os.listdir(tmp_path) == []
    assert capsys.readouterr().err.strip().splitlines()[-1] == "stopped: no audio had been made yet, so no file was left"


def test_sampling_never_waits_for_the_device_during_a_piece():
    """A step reads nothing back to the host (on a GPU that would stall the queue every step, and a CUDA
    graph could not hold the sampler): the host reads happen per window, the same for 40 steps as for 120."""
    reads_back = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
                  torch.ops.aten.equal.default, torch.ops.aten.multinomial.default}
    counts = [bench.count_ops(lambda: decoding.sample(open_tiny("delay"), stub_text_encoder, ["a", "b"], steps, "cpu", top_k=50,
                                               top_p=0.9, cfg=2.0), only=reads_back)[0] for steps in (40, 120)]
    assert counts[0] == counts[1] <= 4


def test_compiled_decoding_equals_eager(capsys):
    """decode=compile (the step and the sampler compiled together, what a CPU uses for long pieces, called
    straight on the tensors it was compiled with) samples the same codes, also across windows: each new
    window's prefill writes its state into those tensors."""
    net = fast_tiny("delay", positions="absolute", max_len=16)
    kwargs = dict(steps=30, device="cpu", seed=2, top_k=50, cfg=2.0)
    eager = decoding.sample(net, stub_text_encoder, ["a", "b"], mode="eager", **kwargs)
    compiled = decoding.sample(net, stub_text_encoder, ["a", "b"], mode="compile", **kwargs)
    assert "decode=compile failed" not in capsys.readouterr().err
    assert torch.equal(eager, compiled)


def test_compiled_steps_give_eager_logits_across_ring_wraps_and_a_new_prefill():
    """decode=compile's step on a CPU (inductor's kernels, called straight on the state's tensors): eager's
    logits over 112 steps (the local heads' ring of 7 wraps 16 times), and again after a second prefill
    writes a new prompt's state into the same tensors. Sampled codes alone would hide an error of 0.03 in
    the logits, which a miscompiled FAVOR+ state update gives."""
    net = fast_tiny("delay")
    text, mask = stub_text_encoder(["a", "b"], "cpu")
    tokens = torch.randint(0, 1024, (2, 4, 150), generator=torch.Generator().manual_seed(0))
    logits = {}
    with torch.no_grad():
        for mode in ("eager", "compile"):
            decoder, out = decoding.Decoder(net, 2, "cpu", mode), []
            for start, end in ((0, 120), (120, 150)):
                out.append(decoder.prefill(tokens[..., start:start + 8], text, mask))
                out += [decoder.step(tokens[..., t]) for t in range(start + 8, end)]
            logits[mode] = torch.stack(out)
    assert decoder.mode == "compile" and "step" in decoder.replays
    assert (logits["eager"] - logits["compile"]).abs().max() < 1e-4


def test_decode_weights_are_bf16_on_a_cpu_only_while_a_step_is_small():
    assert generate.weights_dtype("auto", "cpu", 2) == torch.bfloat16
    assert generate.weights_dtype("auto", "cpu", 10) == torch.float32
    assert generate.weights_dtype("auto", "cpu", 8) == torch.bfloat16
    assert generate.weights_dtype("auto", "cuda:0", 64) == torch.bfloat16
    assert generate.weights_dtype("float32", "cpu", 2) == torch.float32


def test_an_eager_decode_error_is_not_reported_as_a_compile_failure(capsys):
    decoder = decoding.Decoder(open_tiny("parallel"), 1, "cpu", "eager")
    with pytest.raises(KeyError):                      # a step before prefill: the text's keys are missing
        decoder.step(torch.zeros(1, 4, dtype=torch.long))
    assert "decode=compile failed" not in capsys.readouterr().err
