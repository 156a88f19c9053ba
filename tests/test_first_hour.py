"""A newcomer's first hour: --help on every script, names from other trainers understood, progress with the
time left, pieces exactly as long as asked."""
import ast
import json
import os
import re
import subprocess
import sys

import pytest

import app
import bench
import codec
import compress
import deploy
import evaluate
import example
import export
import generate
import settings
from conftest import ROOT, TINY_TRAIN, write_shards

SCRIPTS = [app, bench, compress, deploy, evaluate, example, export, generate]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_help_lists_every_setting_with_its_default(script, capsys):
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as e:
            script.main([flag])
        assert e.value.code == 0
        text = capsys.readouterr().out
        for name, default in settings.settings(vars(script)).items():
            line = next((line for line in text.splitlines() if line.strip().startswith(f"--{name}=")), None)
            assert line is not None, f"{script.__name__}: --{name} missing from --help"
            shown = re.split(r"\s{2,}", line.strip())[0].split("=", 1)[1]
            assert ast.literal_eval(shown) == default, line
        assert "usage:" in text and f"python {script.__name__}.py" in text


def test_help_as_a_user_runs_it():
    result = subprocess.run([sys.executable, "deploy.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and '--lr="auto"' in result.stdout and "# optimisation" in result.stdout


@pytest.mark.parametrize("script,given,meant", [
    (deploy, "learning_rate", "lr"), (deploy, "epochs", "max_steps"), (deploy, "steps", "max_steps"),
    (deploy, "bs", "batch_size"), (deploy, "batch", "batch_size"), (deploy, "output_dir", "out"),
    (compress, "output_dir", "output"), (generate, "prompt_text", "prompt"), (generate, "duration", "seconds"),
    (generate, "cfg_scale", "cfg"), (generate, "guidance_scale", "cfg"), (generate, "second", "seconds"),
])
def test_names_from_other_trainers_point_to_ours(script, given, meant):
    with pytest.raises(SystemExit) as e:
        script.main([f"--{given}=1"])
    assert str(e.value.code).startswith(f"error: unknown setting --{given} (did you mean --{meant}?)")


def test_the_troubleshooting_page_shows_what_a_misspelt_setting_prints():
    with pytest.raises(SystemExit) as e:
        deploy.main(["--learning_rate=1e-3"])
    assert f"`{e.value.code}`" in open(os.path.join(ROOT, "docs", "troubleshooting.md")).read()


def test_example_passes_codec_weights_on(tmp_path):
    missing = tmp_path / "encodec_48khz-7e698e3e.th"
    with pytest.raises(SystemExit) as e:        # compress.py, the first to need the codec, names the file it was given
        example.main([f"--out={tmp_path / 'ex'}", "--codec=pretrained", f"--codec_weights={missing}", "--clips_per_label=1",
                      "--clip_seconds=2"])
    assert f"could not load the pretrained Encodec 48 kHz weights from {missing}" in str(e.value.code)


def test_training_says_where_it_is_and_how_long_it_has_left(tmp_path, capsys):
    out = tmp_path / "run"
    deploy.main(["--data", str(write_shards(tmp_path / "data")), "--out", str(out), *TINY_TRAIN, "--max_steps=3",
                 "--eval_interval=3"])
    said = capsys.readouterr().out
    assert re.search(r"step 1/3 \(33%\): loss .* · \d+:\d\d elapsed, \d+:\d\d left", said) and "step 3/3 (100%)" in said
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert all({"elapsed_s", "eta_s"} <= set(r) and r["total_steps"] == 3 for r in logged)
    assert logged[0]["eta_s"] is not None and logged[-1]["elapsed_s"] >= logged[0]["elapsed_s"]
    page = (out / "index.html").read_text()
    assert 'data-state="finished"' in page and re.search(r"finished: 3 steps in \d+:\d\d", page) and "location.reload" not in page


def test_a_running_page_reloads_itself_and_a_stopped_one_says_so(tmp_path):
    import watch
    records = [dict(step=5, loss=3.0, ms_per_step=2000.0, elapsed_s=10, eta_s=3700)]
    watch.write_page(str(tmp_path), records, total=20, state="running", refresh=40)
    page = (tmp_path / "index.html").read_text()
    assert "step 5 of 20 (25%) · 0:10 elapsed · about 1:01:40 left" in page and "location.reload" in page
    assert "40 * 1000" in page and ".paused" in page                  # never while a sample plays
    watch.write_page(str(tmp_path), records, total=20, state="stopped")
    page = (tmp_path / "index.html").read_text()
    assert "stopped at step 5 of 20 after 0:10: continue it with --resume" in page and "location.reload" not in page


def test_pieces_are_exactly_as_long_as_asked():
    for seconds in (0.5, 1, 2, 4.96, 5, 10, 40, 123.45):
        steps, samples = codec.steps_for(seconds)
        assert samples == round(seconds * 48_000) and codec.decoded_samples(steps) >= samples
        assert all(codec.decoded_samples(s) < samples for s in range(1, steps))    # the fewest steps that reach it
