"""compress.py: audio folder → Encodec tokens in .h5 shards."""
import json
import os

import h5py
import numpy as np
import pytest
import soundfile as sf
import torch

import common
import compress
import example

FAST = ["--codec=untrained", "--clip_seconds=2", "--min_seconds=1", "--num_workers=0", "--device=cpu"]


def run(inp, out, *extra):
    return compress.main(["--input", str(inp), "--output", str(out), *FAST, *extra])


def read_shards(out):
    rows = {}
    for path in compress.finished_shards(str(out)):
        with h5py.File(path) as f:
            for i, src in enumerate(f["source"][:]):
                rows[src.decode()] = (f["codes"][i], int(f["lengths"][i]), f["scales"][i], f["text"][i].decode())
    return rows


def test_tokens_equal_encodec_and_round_trip(music_dir, tmp_path):
    out = tmp_path / "out"
    assert run(music_dir, out) == 0
    [shard] = compress.finished_shards(str(out))
    with h5py.File(shard) as f:
        assert f["codes"].dtype == np.int16 and f["codes"].shape == (6, 4, 300)   # 3 files × (2 s + 2 s remainder)
        assert f["lengths"].dtype == np.int32 and f["scales"].shape == (6, 2)
        assert f["codes"].chunks == (1, 4, 300) and f["codes"].compression == "gzip"
        assert f.attrs["codec"] == "untrained:seed=0" and f.attrs["n_q"] == 4
        assert f.attrs["frame_rate"] == 150 and f.attrs["sample_rate"] == 48000 and f.attrs["clip_seconds"] == 2
        assert f["source"][0].decode() == "clip0.wav@0.00" and f["text"][0].decode() == "upbeat major arpeggio"
        codes, scales = f["codes"][1], f["scales"][1]          # second clip of clip0.wav, starting at 1.98 s
    assert f"clip0.wav@{2 * common.SEGMENT_STRIDE / 48000:.2f}" in read_shards(out)
    codec = common.load_codec("untrained", "", 0, 6.0, "cpu")
    audio = common.load_audio(str(music_dir / "clip0.wav"))
    start = 2 * common.SEGMENT_STRIDE
    x = audio[:, start:start + common.clip_samples(2)][None]
    frames = codec.encode(x)[:2]                                  # the package's own encoder
    assert np.array_equal(codes, torch.cat([c for c, _ in frames], -1)[0].numpy())
    assert np.allclose(scales, torch.cat([s for _, s in frames], -1)[0].numpy())
    y = common.decode_codes(codec, torch.from_numpy(codes[None]).long(), torch.from_numpy(scales[None]))
    assert y.shape == (1, 2, common.clip_samples(2))
    # the stored scale restores the clip's loudness (per-clip, not a dataset average)
    assert 0.3 < y.pow(2).mean().sqrt() / x.pow(2).mean().sqrt() < 3


def test_label_sources(tmp_path):
    clip = example.synth_clip(seconds=2.5)
    def folder(name, files):
        d = tmp_path / name
        d.mkdir()
        for f in files:
            sf.write(d / f, clip, 48_000)
        return d
    d = folder("jsonl", ["a.wav", "b.wav"])
    (d / "metadata.jsonl").write_text(json.dumps({"file": "a.wav", "text": "lofi, chill"}) + "\n")
    assert run(d, tmp_path / "o1") == 0
    texts = {k.split("@")[0]: v[3] for k, v in read_shards(tmp_path / "o1").items()}
    assert texts == {"a.wav": "lofi, chill", "b.wav": ""}          # b.wav has no label: empty text
    d = folder("sidecars", ["c.wav", "d.wav"])
    (d / "sub").mkdir()
    sf.write(d / "sub/e.wav", clip, 48_000)
    (d / "c.txt").write_text("baroque harpsichord\n")
    (d / "d.json").write_text(json.dumps({"description": "", "genre": "jazz", "moods": ["calm", "warm"], "instrument": "piano"}))
    (d / "sub/e.json").write_text(json.dumps({"description": "an epic trailer"}))
    assert run(d, tmp_path / "o2") == 0
    texts = {k.split("@")[0]: v[3] for k, v in read_shards(tmp_path / "o2").items()}
    assert texts == {"c.wav": "baroque harpsichord", "d.wav": "jazz, calm, warm, piano", "sub/e.wav": "an epic trailer"}


def test_odd_formats(tmp_path, capsys):
    d = tmp_path / "odd"
    d.mkdir()
    mono = example.synth_clip(seconds=2.5)[:, :1]
    sf.write(d / "mono_22k.wav", mono[::2], 24_000)
    sf.write(d / "u8.wav", mono, 48_000, subtype="PCM_U8")
    sf.write(d / "six.flac", np.repeat(mono, 6, axis=1) * 0.5, 44_100)
    sf.write(d / "x.ogg", example.synth_clip(seconds=2.5), 48_000)
    sf.write(d / "x.mp3", example.synth_clip(seconds=2.5), 44_100)
    assert run(d, tmp_path / "o") == 0
    assert sorted(k.split("@")[0] for k in read_shards(tmp_path / "o")) == ["mono_22k.wav", "six.flac", "u8.wav", "x.mp3", "x.ogg"]
    assert "unlabeled files (empty text): 5" in capsys.readouterr().out


def test_bad_files_are_skipped_with_reasons(tmp_path, capsys):
    d = tmp_path / "zoo"
    d.mkdir()
    sf.write(d / "good.wav", example.synth_clip(seconds=2.5), 48_000)
    (d / "empty.wav").write_bytes(b"")
    (d / "garbage.flac").write_bytes(os.urandom(5000))
    (d / "notes.mp3").write_text("this is not audio")
    sf.write(d / "silent.wav", np.zeros((48_000 * 3, 2), np.float32), 48_000)
    sf.write(d / "short.wav", example.synth_clip(seconds=0.5), 48_000)
    good = (d / "good.wav").read_bytes()
    (d / "truncated.wav").write_bytes(good[:len(good) // 2])   # header promises more than is there
    assert run(d, tmp_path / "o") == 0
    out = capsys.readouterr().out
    assert sorted({k.split("@")[0] for k in read_shards(tmp_path / "o")}) == ["good.wav", "truncated.wav"]
    for line in ["skip empty.wav: empty file", "skip garbage.flac: unreadable", "skip notes.mp3: unreadable",
                 "skip silent.wav: silent", "skip short.wav: too short"]:
        assert line in out
    assert "skipped files: 5" in out
    # nothing at all encodable: non-zero exit
    for f in ["good.wav", "truncated.wav"]:
        (d / f).unlink()
    assert run(d, tmp_path / "o3") == 1


def test_interrupted_run_resumes_to_the_same_clips(music_dir, tmp_path):
    assert run(music_dir, tmp_path / "clean", "--shard_clips=1") == 0
    clean = read_shards(tmp_path / "clean")
    assert len(clean) == 6 and len(compress.finished_shards(str(tmp_path / "clean"))) == 3
    # an interrupted run: one finished shard, and a half-written one under its temporary name (kill -9)
    part = tmp_path / "part"
    assert run(music_dir, part, "--shard_clips=1") == 0
    shards = compress.finished_shards(str(part))
    os.replace(shards[2], shards[2] + ".tmp999")
    os.remove(shards[1])
    with open(shards[2] + ".tmp999", "r+b") as f:
        f.truncate(1000)
    assert run(music_dir, part, "--shard_clips=1") == 0
    resumed = read_shards(part)
    assert resumed.keys() == clean.keys()
    assert all(np.array_equal(resumed[k][0], clean[k][0]) for k in clean)
    assert not [p for p in os.listdir(part) if ".tmp" in p]
    # and a rerun with everything done does nothing
    assert run(music_dir, part) == 0 and read_shards(part).keys() == clean.keys()


def test_settings_errors(music_dir, tmp_path):
    with pytest.raises(SystemExit, match="unknown setting --clip_secs .*did you mean --clip_seconds"):
        run(music_dir, tmp_path / "o", "--clip_secs=3")
    with pytest.raises(SystemExit, match="--batch_size takes a whole number, not 'many'"):
        run(music_dir, tmp_path / "o", "--batch_size=many")
    with pytest.raises(SystemExit, match="is not a folder"):
        compress.main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="made with clip_seconds=2, not 3"):
        run(music_dir, tmp_path / "o2")
        run(music_dir, tmp_path / "o2", "--clip_seconds=3")


def test_pretrained_codec_without_internet_fails_clearly(tmp_path):
    with pytest.raises(SystemExit, match="codec_weights=PATH.*codec=untrained"):
        common.load_codec("pretrained", str(tmp_path / "missing.th"), 0, 6.0, "cpu")


def test_each_torchrun_rank_encodes_its_own_share(music_dir, tmp_path, monkeypatch):
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert run(music_dir, tmp_path / "o") == 0
    shards = [os.path.basename(p) for p in compress.finished_shards(str(tmp_path / "o"))]
    assert shards == ["shard-r000-00000.h5", "shard-r001-00000.h5"]
    by_rank = [{k.split("@")[0] for k in read_shards_file(tmp_path / "o" / s)} for s in shards]
    assert by_rank == [{"clip0.wav", "clip2.wav"}, {"clip1.wav"}]


def read_shards_file(path):
    with h5py.File(path) as f:
        return [s.decode() for s in f["source"][:]]


def test_resume_after_kill_9(tmp_path):
    """A real kill -9 in the middle of a run, then a rerun: the same clips as a clean run, none twice."""
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    music = tmp_path / "music"
    music.mkdir()
    for i in range(8):
        sf.write(music / f"f{i}.wav", example.synth_clip(seconds=2.5, seed=i), 48_000)
    args = ["--input", str(music), *FAST, "--shard_clips=1", "--batch_size=2"]
    proc = subprocess.Popen([sys.executable, "compress.py", *args, "--output", str(tmp_path / "killed")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not compress.finished_shards(str(tmp_path / "killed")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(compress.finished_shards(str(tmp_path / "killed"))) < 8           # it was stopped part-way
    assert compress.main([*args, "--output", str(tmp_path / "killed")]) == 0
    assert compress.main([*args, "--output", str(tmp_path / "clean")]) == 0
    killed, clean = read_shards(tmp_path / "killed"), read_shards(tmp_path / "clean")
    assert killed.keys() == clean.keys() and len(clean) == 8
    assert sum(len(read_shards_file(p)) for p in compress.finished_shards(str(tmp_path / "killed"))) == 8
