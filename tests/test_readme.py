"""Every command in the ```bash blocks of README.md and of docs/ runs, in order, in one fresh folder: the
documentation cannot rot. Each gets overrides appended that make it small (tiny model, short clips, untrained
codec, CPU); a command already run (the same words in two pages) runs once."""
import glob
import os
import re
import shlex
import subprocess
import sys

import soundfile as sf

import example
from conftest import ROOT, TINY_TRAIN

SMALL = {
    "compress.py": ["--codec=untrained", "--clip_seconds=2", "--min_seconds=1", "--num_workers=0", "--device=cpu", "--check_codec=2"],
    "deploy.py": TINY_TRAIN + ["--max_steps=4", "--eval_interval=2", "--sample_interval=4", "--sample_seconds=0.5"],
    "generate.py": ["--seconds=1", "--device=cpu"],
    "export.py": [],
    "evaluate.py": ["--samples=4", "--seconds=1", "--device=cpu"],
    "app.py": ["--device=cpu", "--port=0"],     # a server: started, seen answering, stopped (below)
    "example.py": ["--clips_per_label=1", "--clip_seconds=3", "--steps=4", "--seconds=1", "--out=example_small"],
    "bench.py": ["--parts=decode", "--modes=eager", "--rounds=1", "--decode_steps=20", "--encode_clips=1", "--encode_seconds=2",
                 "--compress_clips=2", "--cap_seconds=300", "--device=cpu"],
}


# the pages, in the order their commands build on each other (README's own folder first)
PAGES = ["README.md", "docs/data.md", "docs/training.md", "docs/quality.md", "docs/generating.md", "docs/performance.md",
         "docs/troubleshooting.md", "docs/gpu.md"]


def readme_commands():
    commands = []
    for page in PAGES:
        text = open(os.path.join(ROOT, page)).read()
        blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
        commands += [line.strip() for block in blocks for line in block.splitlines() if line.strip()]
    return list(dict.fromkeys(commands))


def test_every_page_is_run_here_and_linked_from_readme():
    pages = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    assert sorted(set(pages) - {"docs/benchmark-log.md"}) == sorted(PAGES[1:])
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert all(f"({page})" in readme for page in pages) and len(readme.encode()) < 16_000


def runnable(command):
    """README command → the argv this test runs, or None for the install step (CI runs it)."""
    words = shlex.split(command)
    if words[:2] == ["pip", "install"]:
        return None
    if words[0] == "torchrun":
        words = [sys.executable, "-m", "torch.distributed.run"] + [
            "--nproc_per_node=2" if w.startswith("--nproc_per_node") else w for w in words[1:]]
    elif words[0] == "python":
        words[0] = sys.executable
    script = next(w for w in words if w.endswith(".py"))
    words[words.index(script)] = os.path.join(ROOT, script)
    extra = list(SMALL[script])
    if "--resume" in words:
        extra.append("--max_steps=6")
    if any(w.startswith("--continue_from") for w in words):
        extra.append("--seconds=2")
    return words + extra


def serve_briefly(argv, cwd, env):
    """app.py as README starts it: it serves its page (fetched once), then Ctrl-C ends it with one line."""
    import http.client
    import signal
    from urllib.parse import urlsplit
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = next((line.split()[-1] for line in proc.stdout if "Running on local URL" in line), None)
    assert url, f"app.py did not start (exit code {proc.wait()})"
    page = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=60)   # this machine only
    page.request("GET", "/")
    assert b"music-transformer" in page.getresponse().read()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) in (0, 130)


def test_every_readme_command_runs(tmp_path):
    commands = readme_commands()
    scripts = {re.search(r"(\w+\.py)", c).group(1) for c in commands if ".py" in c}
    assert scripts == set(SMALL), "each script the README runs has small settings here"
    # the user's folder of audio that the README's commands refer to
    example.make_dataset(str(tmp_path / "music"), clips_per_label=1, seconds=2.5)
    sf.write(tmp_path / "intro.wav", example.synth_clip(seconds=1.2), 48_000)
    env = dict(os.environ, PYTHONPATH=ROOT)   # torchrun sets one thread per process itself
    for command in commands:
        argv = runnable(command)
        if argv is None:
            continue
        if "app.py" in command:
            serve_briefly(argv, tmp_path, env)
            continue
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert (tmp_path / "runs" / "first" / "ckpt.pt").exists()                # README's own-folder block
    run = tmp_path / "runs" / "lofi"
    assert {"ckpt.pt", "metrics.jsonl", "loss.png", "samples"} <= set(os.listdir(run))
    assert any(name.endswith(".mp3") for name in os.listdir(run / "samples"))
    assert (tmp_path / "runs" / "lofi-8gpu" / "ckpt.pt").exists() and (tmp_path / "runs" / "lofi-tuned" / "ckpt.pt").exists()
    assert sorted(os.listdir(tmp_path / "lofi-model")) == ["config.json", "model.safetensors"]
    assert {"chill_lofi_relaxed.mp3", "upbeat_drums.mp3", "jazz_piano.mp3", "ambient_drone_slow.mp3"} <= set(os.listdir(tmp_path / "samples"))
    assert (tmp_path / "data" / "codec_check" / "summary.json").exists()
    assert len([f for f in os.listdir(tmp_path / "example_small" / "samples") if f.endswith(".mp3")]) == 12
    page = (tmp_path / "example_small" / "run" / "index.html").read_text()     # the demo's page has something to hear
    heard = re.findall(r'<audio [^>]*src="([^"]+)"', page)
    assert len(heard) == 3 and all((tmp_path / "example_small" / "run" / src).exists() for src in heard)
    assert 'data-state="finished"' in page
    from conftest import browser_dom                                            # as a browser shows it: every image loads
    dom = browser_dom(tmp_path / "example_small" / "run" / "index.html", tmp_path / "profile")
    assert 'data-broken="0"' in dom and dom.count("<audio") == 3 and "finished: 4 steps" in dom
    assert "A decode step of the default model" in (tmp_path / "docs" / "benchmark-log.md").read_text()   # bench.py's log
