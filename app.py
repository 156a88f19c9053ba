"""
A page to make and hear music from a trained model: prompts in, players that start while the pieces are
made, each with its spectrogram and a download of the file and its .json (the same files generate.py
writes: any piece can be made again from the command line).

    python app.py --ckpt=runs/lofi                   # a run folder, its ckpt.pt, or a folder written by export.py
    python app.py --ckpt=lofi-model --port=7861
    python app.py --ckpt=runs/lofi --share           # a public gradio.live link (needs internet)

On a rented VM, forward the port and open the page on your own machine:
    ssh -L 7860:localhost:7860 you@the-vm            # then open http://localhost:7860

The model is loaded once and kept on the device; requests wait their turn (one at a time on the device).
Pieces go into --out with generate.py's names (nothing is replaced); a stopped request leaves only
`.partial` files.
"""
import contextlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time

import settings  # first: Ctrl-C while the libraries below load then ends in one line, not a traceback
import numpy as np

import audio
import codec
import common
import decoding
import generate
from settings import UserError

# -----------------------------------------------------------------------------
# settings: edit here, or override on the command line as --name=value
ckpt = "runs/music"         # a run folder of deploy.py, its ckpt.pt, or a folder written by export.py
out = "app_samples"         # every piece made, with its .json and spectrogram
host = "127.0.0.1"          # the address to listen on (0.0.0.0: every interface of the machine)
port = 7860                 # the port to listen on (0: the first free one from 7860)
share = False               # also a public gradio.live link (needs internet)
ema = True                  # the checkpoint's EMA weights (false: the raw weights of its last step)
max_seconds = 600.0         # the longest piece the page offers
max_pieces = 8              # the most pieces one request makes (prompts × samples)
decode_dtype = "auto"       # weights while decoding: auto, float32, bfloat16 (generate.py's --decode_dtype)
codec_weights = ""          # local Encodec weights (pretrained codec without internet)
device = "auto"             # auto (cuda when available), cpu, cuda
# -----------------------------------------------------------------------------


def number(value, what, low, high, whole=False):
    """A number the page or its API sent, checked (NaN, infinities, text, out of range): one line in the page's words."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        value = str(value)
    try:
        x = value if isinstance(value, int) else float(value)
    except ValueError:
        x = math.nan
    if not math.isfinite(x) or not low <= x <= high or (whole and x != int(x)):
        raise UserError(f"{what} must be {'a whole number' if whole else 'a number'} from {low:g} to {high:g}, not {value!r}")
    return int(x) if whole else float(x)


def request(c, prompts, seconds, cfg, top_k, top_p, temperature, seed, random_seed, num_samples, continue_from):
    """generate.py's settings for one request from the page (or its API), every input checked before any work:
    UserError, one line in the page's words, for what to change."""
    if not isinstance(prompts, str):
        raise UserError("the prompts must be text, one per line")
    texts = [line.strip() for line in prompts.splitlines() if line.strip()]
    if not texts:
        raise UserError("write a prompt first (one per line for several pieces at once)")
    pieces = number(num_samples, "Samples per prompt", 1, c["max_pieces"], whole=True)
    if len(texts) * pieces > c["max_pieces"]:
        raise UserError(f"{len(texts)} prompts × {pieces} samples is more than the {c['max_pieces']} pieces a "
                        "request makes: fewer prompts or samples")
    if random_seed not in (True, False):
        raise UserError(f"'random seed' is a checkbox: true or false, not {random_seed!r}")
    seed = random.randrange(2**31) if random_seed else number(seed, "Seed", 0, 2**53, whole=True)
    if continue_from:
        name = os.path.basename(str(continue_from))
        try:
            held = audio.audio_seconds(str(continue_from))
        except (ValueError, OSError) as e:
            raise UserError(f"the file to continue from ({name}) is not audio this page can read ({settings.first_line(e, 80)})") from None
        if held is not None and held < 1:
            raise UserError(f"the file to continue from ({name}) holds {held:.2f} s of audio: it needs at least 1 s")
    request = dict(settings.settings(vars(generate)), prompt=texts, num_samples=pieces, seed=seed,
                   seconds=number(seconds, "Seconds", 1, c["max_seconds"]), cfg=number(cfg, "Guidance", 1, 100),
                   top_k=number(top_k, "Top-k", 0, 1024, whole=True), top_p=number(top_p, "Top-p", 0.01, 1),
                   temperature=number(temperature, "Temperature", 0.01, 100),
                   continue_from=continue_from or "", out=c["out"], ckpt=c["ckpt"], spectrogram=True, format="mp3")
    generate.validate(request)
    return request


def make(session, c, *inputs, progress=None):
    """Make the pieces one request asks for: a generator that yields, as each second of audio is written,
    (status line, [(48000, int16 (samples, 2)) per piece: the audio just written], finished pieces [(path,
    .json, spectrogram)], the seed used). The page streams the audio to its players; a test calls it
    directly. Bad input: UserError before any work."""
    asked = request(c, *inputs)
    session.check(asked)
    cut = session.text_encoder.cut(asked["prompt"])
    said = "".join(f"prompt {i + 1} is longer than the {session.text_encoder.MAX_TOKENS} tokens the model reads: it "
                   f"reads up to {kept[-40:]!r}, not {rest[:40]!r}... · " for i, (kept, rest) in cut.items())
    job = generate.Pieces(session, asked)
    t0, first = time.time(), None
    with contextlib.closing(iter(job)) as pieces:     # a stopped request closes it: its files stay .partial
        for seconds, wavs in pieces:
            first = first or (time.time(), seconds)
            pace = (seconds - first[1]) / max(1e-9, time.time() - first[0])
            chunks = [(codec.SAMPLE_RATE, (wav.clamp(-1, 1).numpy().T * 32767).astype(np.int16)) for wav in wavs]
            yield (f"{said}{job.describe()}: {seconds:.0f} of {asked['seconds']:g} s written"
                   + (f" ({pace:.2f}× real time)" if pace else ""), chunks, [], asked["seed"])
    took = time.time() - t0
    finished = [(path, path + ".json", path + ".png") for path in job.paths]
    yield (f"{said}{len(job.paths)} × {asked['seconds']:g} s in {took:.1f} s, seed {asked['seed']}: "
           f"{', '.join(os.path.basename(p) for p in job.paths)}", [], finished, asked["seed"])


def page(session, c):
    """The gradio page: the prompt box and settings, a player per piece, the files and the history."""
    import gradio as gr
    examples = [p for p in session.info["data"].get("sample_prompts", []) if p]
    own, line = session.sampling(dict.fromkeys(decoding.SAMPLING_RANGES, "auto"))
    with gr.Blocks(title="music-transformer") as demo:
        gr.Markdown(f"## music-transformer: make music from text\nModel: `{c['ckpt']}` (step {session.info['step']}, "
                    f"{session.info['weights']} weights, codec {session.info['data']['codec']}) on {session.dev}. "
                    f"Pieces are kept in `{c['out']}`. Starting {line}.")
        with gr.Row():
            with gr.Column(scale=2):
                prompts = gr.Textbox(label="Prompts, one per line (made together)", lines=3, elem_id="prompts")
                if examples:
                    gr.Examples([[p] for p in examples], inputs=[prompts], label="The training run's sample prompts")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=1):
                seconds = gr.Slider(1, c["max_seconds"], value=10, step=1, label="Seconds")
                cfg = gr.Slider(1, 10, value=own["cfg"], step=0.1, label="Guidance (1: off)",
                                interactive=session.info["cond_dropout"] > 0)
                top_k = gr.Slider(0, 1024, value=own["top_k"], step=1, label="Top-k (0: off)")
                top_p = gr.Slider(0.05, 1.0, value=own["top_p"], step=0.05, label="Top-p (1: off)")
                temperature = gr.Slider(0.1, 3.0, value=own["temperature"], step=0.05, label="Temperature")
                with gr.Row():
                    seed = gr.Number(0, precision=0, label="Seed")
                    random_seed = gr.Checkbox(False, label="Random (shows the seed it used)")
                num_samples = gr.Slider(1, c["max_pieces"], value=1, step=1, label="Samples per prompt")
                continue_from = gr.Audio(type="filepath", sources=["upload"], label="Continue from (optional)")
        players = [gr.Audio(streaming=True, autoplay=i == 0, visible=i == 0, label=f"Piece {i + 1}", elem_classes=["piece"])
                   for i in range(c["max_pieces"])]
        files = gr.Files(label="Files: each piece and its .json", elem_id="files")
        pictures = gr.Gallery(label="Spectrograms", columns=4, height="auto")
        history = gr.Dataframe(headers=["made", "piece", "prompt", "seed", "seconds"], label="This session, newest first",
                               interactive=False)
        made = gr.State([])

        def run(*inputs):
            past = inputs[-1]
            try:
                for line, chunks, finished, used in make(session, c, *inputs[:-1]):
                    shown = [gr.update(visible=i < len(chunks) or (not chunks and i < len(finished)) or i == 0,
                                       **({"value": wav_bytes(*chunks[i])} if i < len(chunks) else {}))
                             for i in range(c["max_pieces"])]
                    rows = [[time.strftime("%H:%M:%S"), os.path.basename(p), meta["prompt"], used, meta["seconds"]]
                            for p, meta in ((p, _read_json(j)) for p, j, _ in finished)]
                    past = rows + past if finished else past
                    yield (line, used, *shown, [f for p, j, _ in finished for f in (p, j)] or gr.update(),
                           [png for *_, png in finished if os.path.exists(png)] or gr.update(), past, past)
            except UserError as e:                       # bad input: one line on the page, no traceback anywhere
                raise gr.Error(str(e.code).removeprefix("error: "), print_exception=False) from None

        for widget in (seconds, cfg, top_k, top_p, temperature, seed, random_seed, num_samples):
            # the value as it came: the page's own widgets send numbers in range, its API anything (NaN, text, ...),
            # which gradio's own checks would answer with an empty error; request() checks each, in the page's words
            widget.preprocess = lambda payload: payload
        event = go.click(run, [prompts, seconds, cfg, top_k, top_p, temperature, seed, random_seed, num_samples,
                               continue_from, made],
                         [status, seed, *players, files, pictures, history, made], api_name="generate")
        stop.click(None, cancels=[event])
    return demo


def wav_bytes(rate, pcm):
    """A streamed second, (rate, int16 (samples, channels)), as a WAV file in memory: gradio streams bytes to the
    player as they are, where it would write an array into its cache as a file (and keep it)."""
    import io
    import wave
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(pcm.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buffer.getvalue()


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load(c):
    """The session the page serves, made once: the model on the device, its text encoder and codec."""
    dev = common.pick_device(c["device"])
    common.check_writable(c["out"], "out")
    return generate.Session.load(c["ckpt"], c["ema"], dev, generate.weights_dtype(c["decode_dtype"], dev, 2), c["codec_weights"])


def main(argv):
    c = settings.parse_settings(globals(), argv)
    settings.check_ranges(c, dict(port="[0, 65535]", max_seconds="[1, 36000]", max_pieces="[1, 64]"))
    if not os.path.exists(c["ckpt"]):
        raise UserError(f"no model at --ckpt={c['ckpt']}: give a run folder of deploy.py (its --out), its ckpt.pt, or a "
                        f"folder written by export.py{generate.found_here()}")
    print(f"loading {c['ckpt']} (the model, its text encoder and codec), then the page", flush=True)
    session = load(c)
    out = os.path.abspath(c["out"])
    os.makedirs(out, exist_ok=True)
    # gradio keeps a copy of every file it hands the page in its cache (by default under the system's temporary
    # folder, forever): the pieces are served from --out as they are (static paths), the streamed seconds go as
    # bytes, and what is left (uploads to continue from) goes into a folder of this app's own inside --out,
    # emptied of files older than an hour as it runs, and removed when the app ends
    cache = tempfile.mkdtemp(prefix=".app-cache-", dir=out)
    os.environ["GRADIO_TEMP_DIR"] = cache
    import gradio as gr
    gr.set_static_paths([out])
    try:
        demo = page(session, c)
        demo.delete_cache = (600, 3600)
        demo.queue(default_concurrency_limit=1)        # one request at a time on the device; the others wait
        print(f"model {c['ckpt']} loaded on {session.dev}; pieces go to {out}")
        settings.stop_on_sigterm()
        demo.launch(server_name=c["host"], server_port=c["port"] or None, share=c["share"], allowed_paths=[out],
                    footer_links=["api"], quiet=False)
    except OSError as e:
        raise UserError(f"cannot listen on {c['host']}:{c['port']} ({e}): choose another --port") from None
    except KeyboardInterrupt:
        raise settings.stopped("the pieces made are in " + out) from None
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
