"""compress.py: audio folder → Encodec tokens in .h5 shards."""
import json
import os
import signal

import h5py
import numpy as np
import pytest
import soundfile as sf
import torch

import audio
import codec
import compress
import example

FAST = ["--codec=untrained", "--clip_seconds=2", "--min_seconds=1", "--num_workers=0", "--device=cpu", "--check_codec=0"]


def run(inp, out, *extra):
    return compress.main(["--input", str(inp), "--output", str(out), *FAST, *extra])


def read_data(out):
    """What a training run reads from a shard folder (through its index): {source file: [codes of each clip]}."""
    import deploy
    data = deploy.Shards(str(out))
    clips = {}
    for n, source in enumerate(data.sources):
        clips.setdefault(source, []).append(data.read(n, 0, int(data.lengths[n])))
    return clips


def same_data(a, b):
    return a.keys() == b.keys() and all(len(a[k]) == len(b[k]) and all(np.array_equal(x, y) for x, y in zip(a[k], b[k])) for k in a)


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
    assert f"clip0.wav@{2 * codec.SEGMENT_STRIDE / 48000:.2f}" in read_shards(out)
    encodec = codec.load_codec("untrained", "", 0, 6.0, "cpu")
    wav = audio.load_audio(str(music_dir / "clip0.wav"))
    start = 2 * codec.SEGMENT_STRIDE
    x = wav[:, start:start + codec.clip_samples(2)][None]
    frames = encodec.encode(x)[:2]                                  # the package's own encoder
    assert np.array_equal(codes, torch.cat([c for c, _ in frames], -1)[0].numpy())
    assert np.allclose(scales, torch.cat([s for _, s in frames], -1)[0].numpy())
    y = codec.decode_codes(encodec, torch.from_numpy(codes[None]).long(), torch.from_numpy(scales[None]))
    assert y.shape == (1, 2, codec.clip_samples(2))
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


def test_ctrl_c_or_sigterm_keeps_the_files_encoded_so_far(music_dir, tmp_path, monkeypatch, capsys):
    assert run(music_dir, tmp_path / "clean") == 0
    clean = read_shards(tmp_path / "clean")
    calls, real = [], compress.encode_batch

    def terminated_on_second_file(*args):     # SIGTERM (a VM being preempted) while the second file is encoded
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)
    monkeypatch.setattr(compress, "encode_batch", terminated_on_second_file)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as stop:
            run(music_dir, tmp_path / "out", "--batch_size=1")   # a codec call per file
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
    assert stop.value.code == 130 and signal.getsignal(signal.SIGINT) == handlers[1]
    err = capsys.readouterr().err
    assert "stopped: the files this run encoded (1) are in the shards" in err
    kept = read_shards(tmp_path / "out")
    assert sorted(kept) == sorted(k for k in clean if k.startswith("clip0.wav"))     # the whole first file, no part of the second
    monkeypatch.undo()
    assert run(music_dir, tmp_path / "out") == 0
    resumed = read_shards(tmp_path / "out")
    assert resumed.keys() == clean.keys() and all(np.array_equal(resumed[k][0], clean[k][0]) for k in clean)
    assert len(compress.finished_shards(str(tmp_path / "out"))) == 2


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
        codec.load_codec("pretrained", str(tmp_path / "missing.th"), 0, 6.0, "cpu")


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
    killed, clean = read_data(tmp_path / "killed"), read_data(tmp_path / "clean")
    assert same_data(killed, clean) and len(clean) == 8 and all(len(v) == 1 for v in clean.values())    # each file once


# -----------------------------------------------------------------------------
# nothing lost, nothing read wrongly

def test_two_runs_into_one_output_at_once_lose_nothing(tmp_path):
    """Two compress.py processes (two folders, one --output) started together: every clip of both is kept."""
    import subprocess
    import sys
    from conftest import ROOT
    procs = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(4):
            sf.write(folder / f"{name}{i}.wav", example.synth_clip(seconds=2.5, seed=i + (10 if name == "b" else 0)), 48_000)
        procs.append(subprocess.Popen([sys.executable, "compress.py", "--input", str(folder), "--output", str(tmp_path / "out"),
                                       *FAST, "--shard_clips=1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      env=dict(os.environ, OMP_NUM_THREADS="1")))
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stdout.read().decode()[-2000:]
    sources = {k.split("@")[0] for k in read_shards(tmp_path / "out")}
    assert sources == {f"{n}{i}.wav" for n in "ab" for i in range(4)}
    assert len(compress.finished_shards(str(tmp_path / "out"))) == 8


def test_resume_knows_a_file_by_size_and_time_not_only_its_name(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, seed in ((first, 0), (second, 7)):
        folder.mkdir()
        sf.write(folder / "take.wav", example.synth_clip(seconds=2.5, seed=seed), 48_000)
    assert run(first, tmp_path / "out") == 0
    assert run(first, tmp_path / "out") == 0
    assert "1 files are already in the shards" in capsys.readouterr().out
    assert run(second, tmp_path / "out") == 0         # same relative name in another folder, different audio: encoded too
    with h5py.File(compress.finished_shards(str(tmp_path / "out"))[-1]) as f:
        assert f["file_size"][0] == os.path.getsize(second / "take.wav")
    assert len(read_shards_file_all(tmp_path / "out")) == 2 and len(read_data(tmp_path / "out")["take.wav"]) == 2
    sf.write(first / "take.wav", example.synth_clip(seconds=2.5, seed=9), 48_000)    # new audio under the same name
    assert run(first, tmp_path / "out") == 0
    assert "1 files replaced in place (encoded again; the old audio leaves the data): take.wav" in capsys.readouterr().out
    assert len(read_shards_file_all(tmp_path / "out")) == 3 and len(read_data(tmp_path / "out")["take.wav"]) == 2


def read_shards_file_all(out):
    return [s for p in compress.finished_shards(str(out)) for s in read_shards_file(p)]


def test_metadata_as_spreadsheets_and_scripts_write_it(tmp_path, capsys):
    clip = example.synth_clip(seconds=2.5)
    d = tmp_path / "m"
    (d / "sub").mkdir(parents=True)
    for f in ("a.wav", "b.wav", "sub/C.wav", "sub/d.wav", "e.wav"):
        sf.write(d / f, clip, 48_000)
    # Excel's "CSV UTF-8": a byte-order mark; Windows separators; a case mismatch; a row for a missing file
    (d / "metadata.csv").write_bytes("\ufefffile,text\na.wav,calm piano\nsub\\C.wav,dark ambient\nSUB/D.WAV,lofi\n"
                                     "missing.wav,lost\nb.wav,\n".encode("utf-8"))
    assert run(d, tmp_path / "o1") == 0
    out = capsys.readouterr().out
    texts = {k.split("@")[0]: v[3] for k, v in read_shards(tmp_path / "o1").items()}
    assert texts == {"a.wav": "calm piano", "sub/C.wav": "dark ambient", "sub/d.wav": "lofi", "b.wav": "", "e.wav": ""}
    assert "metadata rows that name no audio file (check spelling, folders and letter case): 1: missing.wav" in out
    assert "unlabeled files (empty text): 1: e.wav" in out      # b.wav has a row with an empty text: labelled empty
    (d / "metadata.csv").unlink()
    (d / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"file": "a.wav", "text": None}, {"file": "b.wav", "text": ["jazz", " calm ", None, ""]},
        {"file": "sub/C.wav", "text": 42}]) + "\n")
    assert run(d, tmp_path / "o2") == 0
    texts = {k.split("@")[0]: v[3] for k, v in read_shards(tmp_path / "o2").items()}
    assert texts["a.wav"] == "" and texts["b.wav"] == "jazz, calm" and texts["sub/C.wav"] == "42"


def test_audio_louder_than_full_scale_is_scaled_not_clipped(tmp_path, capsys):
    d = tmp_path / "loud"
    d.mkdir()
    clip = example.synth_clip(seconds=2.5) * 3.0                 # float WAV with peaks at 2.4
    sf.write(d / "hot.wav", clip, 48_000, subtype="FLOAT")
    sf.write(d / "fine.wav", clip / 3, 48_000, subtype="FLOAT")
    assert run(d, tmp_path / "o") == 0
    out = capsys.readouterr().out
    assert "louder than full scale: 1 clips in 1 files (peak up to 2.40) were scaled down to peak 1.0, not clipped: hot.wav" in out
    rows = {k.split("@")[0]: v for k, v in read_shards(tmp_path / "o").items()}
    assert np.array_equal(rows["hot.wav"][0], rows["fine.wav"][0])     # the same music, a lower level
    assert np.allclose(rows["hot.wav"][2], rows["fine.wav"][2] * 3 / 2.4, rtol=1e-3)   # scaled by 1 / peak


def test_long_files_are_read_in_pieces_identical_to_reading_them_whole(tmp_path):
    """A 44.1 kHz file and an MP3 are read in blocks of bounded size; the clips equal those cut from the
    whole file resampled at once, and a file reaches the encoder a few clips at a time."""
    import torchaudio.functional as AF
    x = np.concatenate([example.synth_clip(kind=k, seconds=9, seed=i) for i, k in enumerate(["drums", "pad", "arpeggio"])])
    for name, rate in (("long.wav", 44_100), ("long.mp3", 32_000)):
        sf.write(tmp_path / name, x, rate)
        blocks = list(audio.stream_48k(str(tmp_path / name), block_seconds=2.0))
        assert max(b.shape[1] for b in blocks) <= 2.0 * 48_000 + 1 and len(blocks) > 10
        if name.endswith(".wav"):
            whole = AF.resample(torch.from_numpy(sf.read(tmp_path / name, dtype="float32")[0].T.copy()), rate, 48_000)
            assert torch.equal(torch.cat(blocks, 1), whole)
        pieces = list(compress.file_pieces(str(tmp_path / name), name, 2, 1))
        assert all(len(p["clips"]) <= compress.PIECE_CLIPS for p in pieces) and len(pieces) > 3
        clips = [c for p in pieces for c in p["clips"]]
        joined = torch.cat(blocks, 1)
        start = 5 * 2 * codec.SEGMENT_STRIDE
        assert np.array_equal(clips[5][1], joined[:, start:start + codec.clip_samples(2)].numpy())


def test_progress_counts_audio_encoded(music_dir, tmp_path, capsys):
    assert run(music_dir, tmp_path / "o") == 0
    err = capsys.readouterr().err
    assert "13.5/13.5 s of audio encoded" in err        # 3 files × 4.5 s, counted as encoded, not as read


def test_results_do_not_depend_on_batch_size_or_workers(music_dir, tmp_path):
    assert run(music_dir, tmp_path / "a", "--batch_size=1") == 0
    assert compress.main(["--input", str(music_dir), "--output", str(tmp_path / "b"), *FAST[:-2], "--num_workers=2",
                          "--batch_size=5", "--device=cpu"]) == 0
    a, b = read_shards(tmp_path / "a"), read_shards(tmp_path / "b")
    assert a.keys() == b.keys() and all(np.array_equal(a[k][0], b[k][0]) and np.array_equal(a[k][2], b[k][2]) for k in a)


def test_batched_encoding_equals_the_package():
    """Every segment of clips of different lengths (a remainder among them) through the encoder in batches
    of any size gives exactly the codes and scales of the package's model.encode on each clip."""
    encodec = codec.load_codec("untrained", "", 0, 6.0, "cpu")
    g = torch.Generator().manual_seed(0)
    music = torch.from_numpy(example.synth_clip(seconds=12, seed=3).T.copy())
    clips = [music[:, :codec.clip_samples(s)] * (0.2 + i) for i, s in enumerate((3, 3, 2, 5, 1))]
    clips.append(torch.randn(2, codec.clip_samples(2), generator=g) * 0.05)
    with torch.inference_mode():
        package = []
        for clip in clips:
            frames = encodec.encode(clip[None])[:codec.whole_segments(clip.shape[-1])]
            package.append((torch.cat([c for c, _ in frames], -1)[0], torch.cat([s for _, s in frames], -1)[0]))
        for per_call in (None, 64, 5):   # None: the package's own loop; 16 segments in 5s leave a batch of 1
            encoded = codec.encode_clips(encodec, clips, batched=per_call is not None, per_call=per_call or 64)
            for (codes, scales), (want_codes, want_scales) in zip(encoded, package, strict=True):
                assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales), per_call


def test_both_encode_paths_write_the_same_shards(music_dir, tmp_path):
    assert run(music_dir, tmp_path / "loop", "--encode=loop", "--batch_size=2") == 0
    assert run(music_dir, tmp_path / "batched", "--encode=batched", "--batch_size=7") == 0
    a, b = read_shards(tmp_path / "loop"), read_shards(tmp_path / "batched")
    assert a.keys() == b.keys() and all(np.array_equal(a[k][0], b[k][0]) and np.array_equal(a[k][2], b[k][2]) for k in a)


def test_codec_check_writes_both_sides_of_each_round_trip(music_dir, tmp_path, capsys):
    assert run(music_dir, tmp_path / "o", "--check_codec=2") == 0
    out = capsys.readouterr().out
    folder = tmp_path / "o" / "codec_check"
    summary = json.loads((folder / "summary.json").read_text())
    assert len(summary["clips"]) == 2 and all(np.isfinite(c["snr_db"]) for c in summary["clips"])
    for clip in summary["clips"]:
        decoded = clip["decoded"]
        assert os.path.exists(decoded) and os.path.exists(decoded.replace(".codec.mp3", ".original.mp3"))
        assert sf.info(decoded).duration == pytest.approx(2 * 0.99 + 0.01, abs=0.06)   # one clip of 2 segments
        assert f"{clip['snr_db']:6.1f} dB  {clip['file']}" in out
    assert "codec check: 2 clips" in out and "these numbers mean nothing" in out


def test_codec_check_names_the_clips_it_handles_poorly(tmp_path, capsys):
    (tmp_path / "codec_check").mkdir()
    compress.report_codec_check([("a.wav", 9.0, "x"), ("b.wav", 8.0, "y"), ("noise.wav", 1.5, "z")], str(tmp_path), "encodec_48khz")
    out = capsys.readouterr().out
    assert "median 8.0 dB, worst 1.5 dB; poor round trips (6 dB or more below the median): noise.wav (1.5 dB)" in out
    assert "mean nothing" not in out


def test_the_data_follows_the_folder_after_renames_deletions_replacements_and_relabels(tmp_path, capsys):
    """After any rerun, what training reads is the folder as it is now: each current file once, with its label now;
    a renamed file is known by its bytes (not encoded again), a deleted one leaves, a replaced one has only its new audio."""
    music, out = tmp_path / "music", tmp_path / "data"
    music.mkdir()
    kinds = ["arpeggio", "pad", "drums", "arpeggio", "pad"]
    for i, kind in enumerate(kinds):
        sf.write(music / f"f{i}.wav", example.synth_clip(kind, "major" if i % 2 else "minor", "fast", seconds=2.5, seed=i), 48_000)
    labels = {f"f{i}.wav": f"label {i}" for i in range(5)}
    write_labels = lambda: (music / "metadata.csv").write_text("file,text\n" + "".join(f"{k},{v}\n" for k, v in labels.items()))
    write_labels()
    assert run(music, out) == 0
    first = read_data(out)
    shards_before = compress.finished_shards(str(out))
    capsys.readouterr()
    (music / "sub").mkdir()
    os.rename(music / "f0.wav", music / "sub" / "moved.wav")               # renamed and moved
    os.remove(music / "f1.wav")                                           # deleted
    sf.write(music / "f2.wav", example.synth_clip("drums", "minor", "slow", seconds=2.5, seed=42), 48_000)   # replaced
    labels = {"sub/moved.wav": "label 0", "f2.wav": "label 2", "f3.wav": "a new label", "f4.wav": "label 4"}
    write_labels()                                                        # f3 relabelled
    assert run(music, out) == 0
    said = capsys.readouterr().out
    assert "1 files renamed or moved (the same audio, recognised by its bytes: not encoded again): f0.wav → sub/moved.wav" in said
    assert "1 files deleted (their clips leave the data): f1.wav" in said
    assert "1 files replaced in place (encoded again; the old audio leaves the data): f2.wav" in said
    assert "1 files relabelled (the new label applies; nothing encoded again): f3.wav ('label 3' → 'a new label')" in said
    assert "resuming: 3 files are already in the shards" in said
    now = read_data(out)
    assert sorted(now) == ["f2.wav", "f3.wav", "f4.wav", "sub/moved.wav"] and all(len(v) == 1 for v in now.values())
    assert np.array_equal(now["sub/moved.wav"][0], first["f0.wav"][0])      # the same codes, not encoded again
    assert not np.array_equal(now["f2.wav"][0][:, :300], first["f2.wav"][0][:, :300])   # only the new audio
    import deploy
    data = deploy.Shards(str(out))
    assert dict(zip(data.sources, data.texts)) == labels
    new_shards = set(compress.finished_shards(str(out))) - set(shards_before)
    assert len(new_shards) == 1 and {s.split("@")[0] for s in read_shards_file(new_shards.pop())} == {"f2.wav"}
    assert run(music, out) == 0 and "nothing to encode" in capsys.readouterr().out and same_data(read_data(out), now)


def test_a_run_resumed_after_relabelling_says_so(music_dir, tmp_path, capsys):
    import deploy
    from conftest import TINY_TRAIN
    assert run(music_dir, tmp_path / "data") == 0
    args = ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *TINY_TRAIN, "--val_fraction=0.3", "--eval_interval=100"]
    deploy.main(args + ["--max_steps=1"])
    (music_dir / "metadata.csv").write_text("file,text\n" + "".join(f"clip{i}.wav,relabelled {i}\n" for i in range(3)))
    assert run(music_dir, tmp_path / "data") == 0
    assert "3 files relabelled" in capsys.readouterr().out
    deploy.main(args + ["--max_steps=2", "--resume"])
    said = capsys.readouterr().out
    assert "NOTE: labels changed since the checkpoint (in 1 shard(s); 2 of the 2 validation clips have a new label)" in said


def test_a_damaged_index_or_shard_is_named_as_such(music_dir, tmp_path):
    import deploy
    assert run(music_dir, tmp_path / "data") == 0
    index = tmp_path / "data" / "index.json"
    index.write_text(index.read_text()[:40])                              # an interrupted copy
    with pytest.raises(SystemExit) as e:
        deploy.Shards(str(tmp_path / "data"))
    assert "index.json is damaged or incomplete" in str(e.value.code) and "rerun compress.py" in str(e.value.code)
    assert run(music_dir, tmp_path / "data2") == 0
    shard = compress.finished_shards(str(tmp_path / "data2"))[0]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(SystemExit) as e:
        deploy.Shards(str(tmp_path / "data2"))
    assert "is damaged or incomplete" in str(e.value.code)
