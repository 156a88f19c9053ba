"""A researcher's real folders and habits: every format ffmpeg reads, one live run per folder, a resume
that notices changed data, names in any script, edited files refused before any work, side files that
never stop a run, and Ctrl-C at any moment. CPU, offline, seconds each."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

import audio
import checkpoint
import common
import compress
import deploy
import example
import generate
from conftest import ROOT, TINY_TRAIN, write_shards

FAST = ["--codec=untrained", "--clip_seconds=2", "--min_seconds=1", "--num_workers=0", "--device=cpu", "--check_codec=0"]


def one_line(e):
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# -----------------------------------------------------------------------------
# audio: every format the bundled ffmpeg decodes, each real file once

FORMATS = {"m4a": ["-c:a", "aac"], "opus": ["-c:a", "libopus"], "webm": ["-c:a", "libopus"], "aiff": [],
           "wma": ["-c:a", "wmav2"], "mp3": []}


def test_every_format_ffmpeg_reads_is_encoded_and_the_rest_is_listed(tmp_path, capsys):
    folder = tmp_path / "library"
    folder.mkdir()
    wav = tmp_path / "source.wav"
    sf.write(wav, example.synth_clip(seconds=2.5, sr=44_100), 44_100)
    for ext, codec in FORMATS.items():
        subprocess.run([audio.ffmpeg_exe(), "-v", "error", "-i", str(wav), *codec, str(folder / f"song.{ext}")], check=True)
    (folder / "cover.jpg").write_bytes(b"\xff\xd8 not audio")
    (folder / "metadata.csv").write_text("file,text\nsong.m4a,first\nsong.m4a,second\nsong.opus,calm\n")
    for ext in FORMATS:                           # read in blocks of bounded size, at the file's own rate
        blocks = audio.read_native(str(folder / f"song.{ext}"), block_seconds=0.5)
        rate, channels = next(blocks)
        sizes = [len(b) for b in blocks]
        assert channels == 2 and max(sizes) <= 0.5 * rate and abs(sum(sizes) / rate - 2.5) < 0.1, ext
        assert abs(audio.audio_seconds(str(folder / f"song.{ext}")) - 2.5) < 0.1, ext
    assert compress.main(["--input", str(folder), "--output", str(tmp_path / "data"), *FAST]) == 0
    out = capsys.readouterr().out
    assert f"{len(FORMATS)} files → {len(FORMATS)} clips" in out and "skipped files: 0" in out
    assert "dropped: 0 remainders" in out          # 2.5 s in a clip of 2 segments: a tail under a segment is no loss
    assert "not read, not audio by their names: 1 files: .jpg 1" in out
    assert "listed twice in metadata with different labels" in out and "song.m4a ('first', then 'second')" in out


def test_a_link_loop_and_a_second_path_read_each_file_once(tmp_path):
    root = tmp_path / "music"
    (root / "loop").mkdir(parents=True)
    sf.write(root / "loop" / "a.wav", example.synth_clip(seconds=1.0), 48_000)
    os.symlink("../loop", root / "loop" / "again")          # loop/again/again/... → loop
    os.symlink("loop/a.wav", root / "alias.wav")             # the same file by a second name
    os.symlink("missing.wav", root / "broken.wav")
    files, other = compress.find_audio(str(root), str(tmp_path / "data"))
    assert files == ["alias.wav"] and not other


def test_metadata_that_is_not_utf8(tmp_path, capsys):
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "metadata.csv").write_bytes("file,text\na.wav,café crème\n".encode("cp1252"))   # Excel's plain CSV
    labels, orphans, twice = compress.load_labels(str(tmp_path), ["a.wav"])
    assert labels == {"a.wav": "café crème"} and "read as Windows-1252" in capsys.readouterr().out
    (tmp_path / "metadata.csv").write_bytes(b"file,text\n\x00\x01\x02\x81\x8d")
    with pytest.raises(SystemExit) as e:
        compress.load_labels(str(tmp_path), ["a.wav"])
    assert "is not text" in one_line(e)


def test_file_names_keep_every_script_and_never_collide():
    names = common.file_names(["平静的钢琴", "激烈的鼓", "موسيقى هادئة", "calm!", "calm?", "calm!", "", "!!!", "Café"])
    assert names[:3] == ["平静的钢琴", "激烈的鼓", "موسيقى_هادئة"] and names[8] == "café"
    assert names[3].startswith("calm_") and names[4].startswith("calm_") and names[5] == names[3] + "_1"
    assert names[6] == "unconditional" and names[7].startswith("label_")
    assert len(set(names)) == len(names)


def test_generate_names_pieces_in_their_own_script(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    generate.main(["--ckpt", str(tiny_ckpt), "--prompt=平静的钢琴", "--prompt=激烈的鼓", "--seconds=0.5", "--format=wav",
                   "--out", str(out)])
    assert sorted(os.listdir(out)) == ["平静的钢琴.wav", "平静的钢琴.wav.json", "激烈的鼓.wav", "激烈的鼓.wav.json"]
    assert sf.info(str(out / "激烈的鼓.wav")).frames == 24_000                 # exactly the length asked


# -----------------------------------------------------------------------------
# a run folder: one live run, a checkpoint that knows its data

def test_one_live_run_per_folder(tmp_path, capsys):
    data = write_shards(tmp_path / "data")
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "deploy.py"), "--data", str(data), "--out", str(out),
                              *TINY_TRAIN, "--max_steps=100000", "--log_interval=1000"],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (out / ".lock").exists() or not (out / ".lock").read_text():
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.1)
        with pytest.raises(SystemExit) as e:
            deploy.main(["--data", str(data), "--out", str(out), *TINY_TRAIN, "--max_steps=2"])
        assert f"in use by another run (process {first.pid} on" in one_line(e)
    finally:
        first.kill()                               # killed: it cannot let go of the folder itself
        first.wait()
    assert (out / ".lock").read_text().split()[1] == str(first.pid)
    deploy.main(["--data", str(data), "--out", str(out), *TINY_TRAIN, "--max_steps=2", "--eval_interval=2"])
    said = capsys.readouterr().out
    assert f"last used by process {first.pid}" in said and "takes it over" in said
    assert not (out / ".lock").exists() and (out / "ckpt.pt").exists()


def test_resume_keeps_its_validation_clips_when_shards_come_and_go(tmp_path, capsys):
    data = tmp_path / "data"
    write_shards(data, clips=12)                                            # shard-r000-00000.h5
    out = str(tmp_path / "run")
    args = ["--data", str(data), "--out", out, *TINY_TRAIN, "--val_fraction=0.25", "--eval_interval=2"]
    deploy.main(args + ["--max_steps=2"])
    first = checkpoint.load_checkpoint(os.path.join(out, "ckpt.pt"))["data"]
    assert first["shards"] == {"shard-r000-00000.h5": [os.path.getsize(data / "shard-r000-00000.h5"), 12]}
    assert len(first["validation"]["shard-r000-00000.h5"]) == 3
    write_shards(data, clips=8, rank=1, seed=1)                              # new music: for training
    capsys.readouterr()
    deploy.main(["--data", str(data), "--out", out, "--resume", "--max_steps=4"])
    said = capsys.readouterr().out
    assert "8 clips added (for training), 0 training clips gone" in said and "the 3 validation clips are the same" in said
    assert checkpoint.load_checkpoint(os.path.join(out, "ckpt.pt"))["data"]["validation"] == first["validation"]
    os.remove(data / "shard-r001-00000.h5")                                  # training clips gone: goes on
    deploy.main(["--data", str(data), "--out", out, "--resume", "--max_steps=6"])
    assert "0 clips added (for training), 8 training clips gone" in capsys.readouterr().out
    os.rename(data / "shard-r000-00000.h5", tmp_path / "elsewhere.h5")       # the validation clips gone: refused
    write_shards(data, clips=8, rank=2)
    with pytest.raises(SystemExit) as e:
        deploy.main(["--data", str(data), "--out", out, "--resume", "--max_steps=8"])
    assert "3 of this run's 3 validation clips are gone from --data" in one_line(e) and "shard-r000-00000.h5" in one_line(e)
    assert "--init_from" in one_line(e)
    other = write_shards(tmp_path / "other", clips=8, codec="untrained:seed=5")   # another codec: refused
    with pytest.raises(SystemExit) as e:
        deploy.main(["--data", str(other), "--out", out, "--resume", "--max_steps=8"])
    assert "codec=untrained:seed=0" in one_line(e) and "codec=untrained:seed=5" in one_line(e)


def test_paths_are_taken_literally_and_short_data_is_said(tmp_path, capsys):
    data = write_shards(tmp_path / "data[v1]", clips=1)                     # glob characters in a real folder name
    deploy.main(["--data", str(data), "--out", str(tmp_path / "run*"), *TINY_TRAIN, "--seq_len=600", "--max_steps=1"])
    said = capsys.readouterr().out
    assert "on average 43% of a crop is audio" in said and "--seq_len=260" in said
    assert "no validation set (1 clip(s)" in said and "best validation loss inf" not in said


# -----------------------------------------------------------------------------
# files that were edited, side files that cannot be written

EDITS = [
    (lambda c: c["model"].update(depth=100000), "depth=100000 is out of range"),
    (lambda c: c["model"].update(dim=1000000), "dim=1000000 is out of range"),
    (lambda c: c["model"].update(dim="32"), "dim='32' is not a whole number"),
    (lambda c: c["model"].update(heads=-2), "heads=-2 is out of range"),
    (lambda c: c["model"].update(dim=512), "weights do not match"),
    (lambda c: c.update(data=None), "data settings"),
    (lambda c: c.pop("model"), "model missing or of the wrong kind"),
    (lambda c: c.clear() or c.update(format=[]), "is not a model exported"),
]


@pytest.mark.parametrize("edit,message", EDITS)
def test_an_edited_export_is_refused_before_any_model_is_built(edit, message, tiny_ckpt, tmp_path, monkeypatch):
    import export
    import model as M
    folder = tmp_path / "shared"
    export.export(str(tiny_ckpt), str(folder))
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(M.MusicTransformer, "__init__", lambda *a: pytest.fail("built a model from an edited file"))
    start = time.time()
    with pytest.raises(SystemExit) as e:
        checkpoint.load_model(str(folder))
    assert message in one_line(e) and time.time() - start < 1


def test_a_huge_edited_model_allocates_nothing(tiny_ckpt, tmp_path):
    import export
    folder = tmp_path / "shared"
    export.export(str(tiny_ckpt), str(folder))
    config = json.loads((folder / "config.json").read_text())
    config["model"].update(dim=16384, depth=512, heads=256, dim_head=1024)   # in range, far too big
    (folder / "config.json").write_text(json.dumps(config))
    # generate.py as a user runs it, then the process's own peak memory (VmHWM: this program's, not the forked parent's)
    run = ("import runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
           "finally:\n    print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")
    result = subprocess.run([sys.executable, "-c", run, os.path.join(ROOT, "generate.py"), f"--ckpt={folder}", "--prompt=x",
                             f"--out={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and "weights do not match" in result.stderr and "Traceback" not in result.stderr
    peak_kib = int(result.stdout.split()[-1])
    assert peak_kib < 1024 * 1024, f"peak memory {peak_kib / 1024:.0f} MB"


def test_side_files_that_cannot_be_written_never_stop_training(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(audio, "write_spectrogram", full)
    with pytest.warns(UserWarning, match="could not write the samples of step 2 .No space left on device.; training goes on"):
        deploy.main(["--data", str(write_shards(tmp_path / "data")), "--out", str(tmp_path / "run"), *TINY_TRAIN,
                     "--max_steps=2", "--eval_interval=2", "--sample_interval=2", "--sample_seconds=0.2"])
    assert (tmp_path / "run" / "ckpt.pt").exists()


def test_a_first_checkpoint_that_cannot_be_written_says_so(tmp_path, small_disk):
    from conftest import fill_disk
    disk = small_disk(4096)
    fill_disk(disk, leave_kib=24)
    with pytest.raises(SystemExit) as e:
        deploy.main(["--data", str(write_shards(tmp_path / "data")), "--out", str(disk / "run"), *TINY_TRAIN,
                     "--max_steps=2", "--eval_interval=2"])
    assert "no checkpoint had been written yet" in one_line(e) and "intact" not in one_line(e)


def test_a_piece_without_its_json_is_not_finished(tiny_ckpt, tmp_path, monkeypatch):
    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(common, "write_json", full)
    with pytest.raises(SystemExit) as e:
        generate.main(["--ckpt", str(tiny_ckpt), "--prompt=calm", "--seconds=1", "--format=wav", "--out", str(tmp_path)])
    assert "no space left" in one_line(e)
    assert os.listdir(tmp_path) == ["calm.partial.wav"]


def test_ctrl_c_while_the_libraries_load_is_one_line(tmp_path):
    for script in ("deploy.py", "compress.py", "generate.py"):
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script)], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(0.4)                             # torch takes seconds to import
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "Traceback" not in err and err.strip().startswith("stopped"), (script, err)
