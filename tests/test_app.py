"""app.py: the page to make and hear music, its generation function, the server through gradio's own
client, and the page in a real browser (headless Chromium from Debian)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

import app
import common
import generate
import settings
from conftest import CHROMIUM_FLAGS, ROOT

ARGS = dict(seconds=1, cfg=3.0, top_k=250, top_p=1.0, temperature=1.0, seed=7, random_seed=False, num_samples=1,
            continue_from=None)


def app_settings(ckpt, out):
    return dict(settings.settings(vars(app)), ckpt=str(ckpt), out=str(out), device="cpu")


def ask(session, c, prompts, **changes):
    inputs = dict(ARGS, **changes)
    return list(app.make(session, c, prompts, *inputs.values()))


def test_the_page_makes_what_generate_py_makes(tiny_ckpt, tmp_path):
    c = app_settings(tiny_ckpt, tmp_path / "app")
    session = app.load(c)
    updates = ask(session, c, "calm minor pad\nupbeat drums\n")
    streamed = [np.concatenate([u[1][i][1] for u in updates if u[1]]) for i in range(2)]
    assert all(len(s) == 48_000 and s.dtype == np.int16 for s in streamed)          # 1 s each, as it was made
    finished = updates[-1][2]
    assert [os.path.basename(p) for p, *_ in finished] == ["calm_minor_pad.mp3", "upbeat_drums.mp3"]
    assert all(os.path.exists(f) for piece in finished for f in piece)               # the file, its .json, its picture
    generate.main(["--ckpt", str(tiny_ckpt), "--prompt=calm minor pad", "--prompt=upbeat drums", "--seconds=1", "--seed=7",
                   "--cfg=3", "--top_k=250", "--out", str(tmp_path / "cli")])
    for name in ("calm_minor_pad", "upbeat_drums"):
        page = json.loads((tmp_path / "app" / f"{name}.mp3.json").read_text())
        cli = json.loads((tmp_path / "cli" / f"{name}.mp3.json").read_text())
        assert page["codes"] == cli["codes"] and page["seed"] == cli["seed"] == 7
        assert abs(sf.info(str(tmp_path / "app" / f"{name}.mp3")).frames - 48_000) <= 1152
    again = ask(session, c, "calm minor pad", random_seed=True)                      # nothing replaced; the seed said
    assert os.path.basename(again[-1][2][0][0]) == "calm_minor_pad_1.mp3" and again[-1][3] != 7
    assert f"seed {again[-1][3]}" in again[-1][0]


def test_bad_input_is_one_line_before_any_work(tiny_ckpt, tmp_path):
    c = app_settings(tiny_ckpt, tmp_path)
    session = app.load(c)
    (tmp_path / "notes.txt").write_text("not audio")
    for prompts, changes, message in (("  \n", {}, "write a prompt first"),
                                      ("a", dict(seconds=5000), "Seconds must be a number from 1 to 600, not 5000"),
                                      ("a", dict(seconds=float("nan")), "Seconds must be a number from 1 to 600, not nan"),
                                      ("a", dict(top_p="high"), "Top-p must be a number from 0.01 to 1, not 'high'"),
                                      ("a", dict(num_samples=-1), "Samples per prompt must be a whole number from 1 to 8"),
                                      ("a", dict(random_seed="yes"), "'random seed' is a checkbox"),
                                      ("a\nb\nc", dict(num_samples=3), "more than the 8 pieces"),
                                      ("x" * 501, {}, "prompt 1 is 501 characters long: a prompt may have up to 500"),
                                      ("a", dict(continue_from=str(tmp_path / "notes.txt")),
                                       "the file to continue from (notes.txt) is not audio this page can read")):
        with pytest.raises(SystemExit) as e:
            ask(session, c, prompts, **changes)
        assert message in str(e.value.code) and "\n" not in str(e.value.code)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_a_prompt_longer_than_the_model_reads_is_said_with_what_is_cut(tiny_ckpt, tmp_path):
    c = app_settings(tiny_ckpt, tmp_path)
    words = " ".join(f"word{i}" for i in range(60))
    updates = ask(app.load(c), c, words)
    assert "prompt 1 is longer than the 64 tokens the model reads: it reads up to" in updates[-1][0]
    meta = json.loads((tmp_path / (common.file_names([words])[0] + ".mp3.json")).read_text())
    assert len(json.dumps(meta)) < 20_000                    # a piece's .json stays small


def test_a_stopped_request_leaves_no_file_that_looks_finished(tiny_ckpt, tmp_path):
    c = app_settings(tiny_ckpt, tmp_path)
    pieces = app.make(app.load(c), c, "calm minor pad", *dict(ARGS, seconds=5).values())
    next(pieces)                                        # the first second is out, then the page's Stop closes it
    pieces.close()
    assert os.listdir(tmp_path) == ["calm_minor_pad.partial.mp3"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """app.py serving the tiny checkpoint on a free port of 127.0.0.1, as a user starts it."""
    from conftest import TINY_TRAIN, write_shards
    import deploy
    tmp = tmp_path_factory.mktemp("app_server")
    deploy.main(["--data", str(write_shards(tmp / "data", steps=450)), "--out", str(tmp / "run"), *TINY_TRAIN, "--max_steps=2",
                 "--eval_interval=2", "--cond_dropout=0.3"])
    port = free_port()
    (tmp / "system-tmp").mkdir()                       # the system's temporary folder, as the app sees it
    # started in its folder with paths as a user gives them (README's screenshot shows them)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--ckpt=run", "--out=pieces", f"--port={port}",
                             "--device=cpu"], cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, TMPDIR=str(tmp / "system-tmp")))
    for line in proc.stdout:
        if "Running on" in line:
            break
    else:
        pytest.fail(f"app.py did not start (exit code {proc.wait()})")
    yield f"http://127.0.0.1:{port}/", tmp / "pieces"
    proc.terminate()
    proc.wait(timeout=30)
    assert not [f for f in os.listdir(tmp / "pieces") if f.startswith(".app-cache")]      # its cache goes with it


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files)


def test_the_server_answers_gradio_s_client(server):
    from gradio_client import Client
    url, out = server
    client = Client(url, verbose=False)
    result = client.predict("calm minor pad", *ARGS.values(), [], api_name="/generate")
    status, seed, files = result[0], result[1], result[-3]          # (the session state is not returned)
    assert seed == 7 and "1 × 1 s" in status
    assert sorted(os.path.basename(f) for f in files) == ["calm_minor_pad.mp3", "calm_minor_pad.mp3.json"]
    assert sf.info([f for f in files if f.endswith(".mp3")][0]).duration == pytest.approx(1.0, abs=0.03)
    with pytest.raises(Exception, match="write a prompt first"):
        client.predict("", *ARGS.values(), [], api_name="/generate")
    assert not [f for f in os.listdir(out) if ".partial" in f]
    # nothing of the request is kept outside --out (gradio's cache would hold every streamed second, every piece)
    assert files_under(out.parent / "system-tmp") == []
    assert [f for f in files_under(out) if not f.startswith("calm_minor_pad")] == []


def test_the_api_answers_hostile_numbers_in_words(server):
    """NaN, infinities and text where numbers go, through the HTTP API as JSON: one line the user can act on, never an
    empty error."""
    import httpx
    url, _ = server
    for index, value, message in ((1, float("nan"), "Seconds must be a number from 1 to 600"),
                                  (8, float("nan"), "Samples per prompt must be a whole number"),
                                  (6, "x", "Seed must be a whole number"), (3, -5, "Top-k must be a whole number from 0"),
                                  (2, float("inf"), "Guidance must be a number from 1 to 100"),
                                  (0, "a" * 100_000, "prompt 1 is 100,000 characters long")):
        data = ["calm minor pad", *ARGS.values(), []]
        data[index] = value
        event = httpx.post(f"{url}gradio_api/call/generate", content=json.dumps({"data": data}),
                           headers={"content-type": "application/json"}, timeout=60).json()["event_id"]
        answer = httpx.get(f"{url}gradio_api/call/generate/{event}", timeout=120).text
        assert "event: error" in answer and message in answer, (value, answer[-400:])


def test_the_page_in_a_real_browser(server):
    """Headless Chromium (Debian's, driven by its chromedriver through selenium) opens the page, writes a
    prompt, presses Generate and waits for a player with audio; the screenshot is README's."""
    driver_path, browser = shutil.which("chromedriver"), shutil.which("chromium")
    if not driver_path or not browser:
        pytest.skip("no Debian chromium and chromium-driver here (.ci/run installs them where it can)")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    url, _ = server
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, "--window-size=1300,1900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        driver.get(url)
        box = WebDriverWait(driver, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompts textarea"))
        box.send_keys("upbeat major arpeggio")
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        # the first piece's player, and the finished piece's file as the page serves it (from --out, not a copy)
        WebDriverWait(driver, 120).until(lambda d: ", seed " in d.find_element(By.ID, "status").text     # finished
                                         and d.find_elements(By.CSS_SELECTOR, ".piece audio")
                                         and d.find_elements(By.CSS_SELECTOR, "#files a[download]"))
        source = driver.find_elements(By.CSS_SELECTOR, "#files a[download]")[0].get_attribute("href")
        assert source.endswith("file=pieces/upbeat_major_arpeggio.mp3")          # --out as given, not a copy elsewhere
        fetched = driver.execute_script(f"return fetch({json.dumps(source)}).then(r => r.blob()).then(b => [b.type, b.size])")
        assert fetched[0].startswith("audio/") and fetched[1] > 1000, fetched
        time.sleep(1)
        driver.save_screenshot(str(os.path.join(os.path.dirname(_), "page.png")))
        if os.environ.get("APP_SCREENSHOT"):
            shutil.copy(os.path.join(os.path.dirname(_), "page.png"), os.environ["APP_SCREENSHOT"])
    finally:
        driver.quit()
