"""
Generate music from text with a trained checkpoint, of any length, written as it is made.

    python generate.py --ckpt=runs/lofi/ckpt.pt --prompt="chill lofi, relaxed" --seconds=10
    python generate.py --ckpt=runs/lofi/ckpt.pt --prompt="calm piano" --prompt="upbeat drums" --num_samples=2
    python generate.py --ckpt=runs/lofi/ckpt.pt --prompt="jazz" --continue_from=intro.wav --seconds=20
    python generate.py --ckpt=runs/lofi/ckpt.pt --prompt="ambient drone" --seconds=600   # ten minutes

Writes one MP3 (or WAV) per prompt and sample into --out, each with a .json of every setting used. Tokens
come from the model's recurrent state: one prefill, then constant cost per step. Each second of audio is
decoded and appended to `<name>.partial.mp3` as soon as its tokens exist, so you can listen while it runs;
the finished file is renamed to `<name>.mp3`.
"""
import os
import sys
import time
import warnings

import settings  # first: Ctrl-C while the libraries below load then ends in one line, not a traceback
import torch
from tqdm import tqdm

import audio
import checkpoint
import codec
import common
import decoding
import model as M
from settings import UserError

# -----------------------------------------------------------------------------
# settings: edit here, or override on the command line as --name=value
ckpt = "runs/music/ckpt.pt"  # checkpoint written by deploy.py (or its run folder), or a folder written by export.py
ema = True                   # use the checkpoint's EMA weights (false: the raw weights of its last step)
prompt = []                  # text descriptions; repeat --prompt for several (generated together as one batch)
seconds = 10.0               # length of each piece (with --continue_from: including the prompt audio)
num_samples = 1              # pieces per prompt
top_k = "auto"               # sample among the k most likely codes (0: all of them); auto: the model's own choice, else 0
top_p = "auto"               # ... and within this probability mass (1.0: off); auto: the model's own, else 1.0
temperature = "auto"         # < 1: safer, > 1: wilder; auto: the model's own, else 1.0
cfg = "auto"                 # classifier-free guidance strength (1.0: off); auto: the model's own, else 2.0
# ("the model's own": the settings its training run's last evaluation chose, scoring its samples against its
# validation clips; README: "Generating")
seed = 0                     # the same seed gives the same audio
window_stride = 18.0         # models with absolute positions go past max_len by windows: a new one every this many seconds
out = "samples"              # output folder
format = "mp3"               # mp3 or wav
bitrate = "192k"             # MP3 bitrate
gain_db = 0.0                # loudness change applied after decoding
spectrogram = False          # also write a spectrogram .png beside each file
continue_from = ""           # an audio file to continue (MusicGen-style continuation)
overwrite = False            # replace earlier pieces of the same name (otherwise a number is added: name_1.mp3)
decode = "auto"              # auto (torch.compile from 3 min on a GPU, from 30 s on a CPU; else a CUDA graph / eager), eager, compile, graph
decode_dtype = "auto"        # weights while decoding: auto (bfloat16 on a GPU, and on a CPU up to 8 rows a step), float32, bfloat16
codec_weights = ""           # local Encodec weights (pretrained codec without internet)
device = "auto"              # auto (cuda when available), cpu, cuda
# -----------------------------------------------------------------------------


MAX_PROMPT_CHARACTERS = 500   # the longest prompt taken (the text encoder reads its first 64 tokens: about 250 characters)


def validate(c):
    """Every input check that needs no model, so mistakes fail in a second."""
    if not c["prompt"]:
        raise UserError('no prompt: give at least one, e.g. --prompt="chill lofi, relaxed", and the model with '
                        f'--ckpt=RUN_FOLDER (deploy.py\'s --out, or its ckpt.pt, or a folder of export.py){found_here()}')
    long = [i for i, text in enumerate(c["prompt"], 1) if len(text) > MAX_PROMPT_CHARACTERS]
    if long:
        raise UserError(f"prompt {long[0]} is {len(c['prompt'][long[0] - 1]):,} characters long: a prompt may have up to "
                        f"{MAX_PROMPT_CHARACTERS} (the model reads about the first 250)")
    if not os.path.exists(c["ckpt"]):
        raise UserError(f"no model at --ckpt={c['ckpt']}: give a run folder of deploy.py (its --out), its ckpt.pt, or a "
                        f"folder written by export.py{found_here()}")
    settings.check_ranges(c, dict(seconds="(0, 36000]", num_samples="[1, 1000]", gain_db="[-60, 60]", seed="[0, 9.2e18]",
                                window_stride="(0, 36000]"))
    for name in decoding.SAMPLING_RANGES:
        if c[name] != "auto":
            try:
                c[name] = decoding.sampling_value(name, c[name])
            except ValueError as e:
                raise UserError(f"{e} (or auto: the model's own choice)") from None
    if round(c["seconds"] * codec.FRAME_RATE) < 1:
        raise UserError(f"seconds={c['seconds']} is shorter than one codec step (1/{codec.FRAME_RATE} s): ask for more")
    for name, allowed in (("format", ("mp3", "wav")), ("decode", ("auto", "eager", "compile", "graph")),
                          ("decode_dtype", ("auto", "float32", "bfloat16"))):
        if c[name] not in allowed:
            raise UserError(f"{name}={c[name]!r}: use {' or '.join(allowed)}")
    if c["continue_from"]:
        if not os.path.isfile(c["continue_from"]):
            raise UserError(f"cannot read --continue_from={c['continue_from']!r}: no such file")
        try:
            seconds = audio.audio_seconds(c["continue_from"])
        except (ValueError, OSError) as e:
            raise UserError(f"cannot read --continue_from={c['continue_from']!r} as audio ({settings.first_line(e)})") from None
        if seconds is not None and seconds < 1:
            raise UserError(f"--continue_from={c['continue_from']!r} holds {seconds:.2f} s of audio: give at least 1 s")


def found_here():
    """The run folders under ./runs and the demo's, to name in a message about --ckpt."""
    import glob
    runs = sorted(os.path.dirname(p) for p in glob.glob("runs/*/ckpt.pt") + glob.glob("example_run/run/ckpt.pt"))
    return f"; here: {', '.join(runs[:5])}" if runs else ""


def weights_dtype(requested, device, rows):
    """The weights' dtype while decoding: as asked, else bf16 on a GPU, and on a CPU while a step has at
    most 8 rows (prompts × samples, twice with guidance: there reading the weights dominates, 1.3-1.6×
    faster at 1-2 rows; above it this CPU's bf16 arithmetic, widened to fp32, was 10-15 % slower;
    BENCHMARKS.md). bf16 moves the logits by at most 0.014."""
    if requested != "auto":
        return getattr(torch, requested)
    return torch.bfloat16 if device.startswith("cuda") or rows <= 8 else torch.float32


def check_device(c, device):
    if c["decode"] == "graph" and not device.startswith("cuda"):
        raise UserError("decode=graph needs a CUDA GPU: use --decode=eager (or auto)")


class Session:
    """A model ready to make pieces from (generate.py makes one per run, app.py one for its life): its
    decoding copy on the device, its text encoder, its codec, and the decoders captured for it so far (a
    CUDA graph is captured once per shape and sampling settings, and replayed by every later request that
    has them)."""

    def __init__(self, model, info, text_encoder, encodec, device, dtype, ckpt=""):
        self.model, self.info, self.text_encoder, self.codec = model, info, text_encoder, encodec
        self.dev, self.dtype, self.ckpt, self.decoders = device, dtype, ckpt, {}

    @classmethod
    def load(cls, ckpt, ema=True, device="cpu", dtype=torch.float32, codec_weights=""):
        model, info = checkpoint.load_model(ckpt, ema=ema)
        decoding.for_decoding(model, device, dtype)
        return cls(model, info, checkpoint.TextEncoder(info["text_encoder"], device),
                   codec.codec_for(info["data"], codec_weights, device), device, dtype, ckpt)

    def sampling(self, c):
        """c with its sampling settings that are auto filled in: the model's own choice (its run's last
        evaluation), else decoding's defaults; and a line that says which it used."""
        own = self.info.get("sampling")
        fill = own or decoding.default_sampling(self.info["cond_dropout"])
        auto = [k for k in decoding.SAMPLING_RANGES if c[k] == "auto"]
        c = dict(c, **{k: fill[k] for k in auto})
        where = ("the model's own choice (its run's last evaluation)" if own else
                 "the defaults (the model's run did not choose its own)") if auto else "as given"
        return c, f"sampling: {decoding.describe({k: c[k] for k in decoding.SAMPLING_RANGES})}; " + (
            f"{', '.join(auto)} from {where}" if auto else "all as given")

    def check(self, c):
        """What a request asks that this model cannot do, as one line."""
        if c["cfg"] != 1 and self.info["cond_dropout"] <= 0:
            raise UserError("this model was trained with cond_dropout=0, so it has no unconditional mode: guidance (cfg) must be 1")
        check_device(c, self.dev)


class Pieces:
    """The pieces that settings `c` (generate.py's) ask for, made with a Session and written as they are
    made: iterating samples the codes and, as each second of audio exists, appends it to every piece's
    `.partial` file and yields (seconds written, that audio (pieces, 2, samples) after the gain). At the end
    each piece gets its final name with its .json (`paths`); a run that stops before (an error, Ctrl-C, a
    closed app request) keeps what it made under the partial names (`kept`), never a file that looks
    finished. One place for generate.py's command line and app.py's page."""

    def __init__(self, session, c):
        model_cfg, data = session.model.cfg, session.info["data"]
        self.session, self.c = session, c
        self.steps, self.samples = codec.steps_for(c["seconds"])      # exactly the length asked, to the sample
        self.mode = decoding.decode_mode(c["decode"], session.dev, self.steps)
        self.prompts = [p for p in c["prompt"] for _ in range(c["num_samples"])]
        self.codes = torch.full((len(self.prompts), model_cfg.n_q, self.steps), M.UNKNOWN, dtype=torch.long, device=session.dev)
        self.scale = data["typical_scale"]
        if c["continue_from"]:
            print(f"continuing {c['continue_from']}: reading its last {model_cfg.max_len / codec.FRAME_RATE:g} s at most")
            given, self.scale = prompt_codes(c, session.codec, model_cfg, self.steps, session.dev)
            self.codes[..., :given.shape[-1]] = given
        names = [n + (f"_{i}" if c["num_samples"] > 1 else "") for n in common.file_names(c["prompt"]) for i in range(c["num_samples"])]
        self.targets = [os.path.join(c["out"], f"{name}.{c['format']}") for name in names]
        stride = round(c["window_stride"] * codec.FRAME_RATE)
        self.stride = stride if stride < model_cfg.max_len else model_cfg.max_len * 3 // 5
        self.writers, self.paths, self.kept = [], [], []

    def describe(self):
        cfg = self.session.model.cfg
        carry_on = cfg.positions == "relative" and cfg.attention == "favor"
        return (f"{len(self.prompts)} × {self.c['seconds']:g} s, decoding {self.mode} in {str(self.session.dtype).removeprefix('torch.')} "
                f"on {self.session.dev}; " + ("the state carries on at any length" if carry_on or self.steps <= cfg.max_len else
                                              f"past {cfg.max_len / codec.FRAME_RATE:g} s by windows, a new one every "
                                              f"{self.stride / codec.FRAME_RATE:g} s"))

    def __iter__(self):
        c = self.c
        os.makedirs(c["out"], exist_ok=True)
        self.writers = [audio.AudioWriter(p, c["format"], c["bitrate"], c["overwrite"]) for p in self.targets]
        try:
            yield from self._stream()
            for i, writer in enumerate(self.writers):
                path = writer.close(self.meta(i))      # finished with its .json, or not at all
                self.paths.append(path)
                if c["spectrogram"]:
                    with common.disk_errors(path + ".png", f"{path} and its .json are finished"):
                        audio.write_spectrogram(path + ".png", audio.load_audio(path))
        except BaseException:
            self.kept = [path for path in (w.abort() for w in self.writers) if path]
            raise

    def _stream(self):
        c, s, codes = self.c, self.session, self.codes
        stream, gain = codec.SegmentStream(s.codec, self.scale), 10 ** (c["gain_db"] / 20)
        decoded, written = 0, 0

        def write(wavs):
            nonlocal written
            wavs = wavs[..., :self.samples - written].cpu() * gain
            for writer, wav in zip(self.writers, wavs):
                writer.write(wav)
            written += wavs.shape[-1]
            return written / codec.SAMPLE_RATE, wavs

        sampler = decoding.generate(s.model, s.text_encoder, self.prompts, codes, seed=c["seed"], top_k=c["top_k"],
                                    top_p=c["top_p"], temperature=c["temperature"], cfg=c["cfg"], stride=self.stride,
                                    mode=self.mode, decoders=s.decoders)
        with torch.no_grad():
            for start, end in sampler:
                while end - decoded >= codec.SEGMENT_STEPS or (end == self.steps and decoded < self.steps):
                    yield write(stream.push(codes[..., decoded:decoded + codec.SEGMENT_STEPS]))
                    decoded = min(self.steps, decoded + codec.SEGMENT_STEPS)
            if stream.tail is not None:
                yield write(stream.finish())

    def meta(self, i):
        """Piece i's .json: every setting it was made with, and its codes, so it can be made again."""
        c, s = self.c, self.session
        return dict(prompt=self.prompts[i], seed=c["seed"], batch_index=i, batch_prompts=self.prompts,
                    seconds=self.samples / codec.SAMPLE_RATE, samples=self.samples, steps=self.steps, top_k=c["top_k"],
                    top_p=c["top_p"], temperature=c["temperature"], cfg=c["cfg"], window_stride=c["window_stride"],
                    gain_db=c["gain_db"], scale=self.scale, continue_from=c["continue_from"], format=c["format"],
                    decode=self.mode, decode_dtype=str(s.dtype), ckpt=os.path.abspath(s.ckpt), ckpt_step=s.info["step"],
                    weights=s.info["weights"], codec=s.info["data"]["codec"], sample_rate=codec.SAMPLE_RATE,
                    codes=self.codes[i].tolist())

    def stopped(self):
        """What a run stopped before its end left, in words."""
        where = (f"the audio made so far is kept in {', '.join(self.kept)}" if self.kept else
                 "no audio had been made yet, so no file was left")
        return where + (f" (finished before it: {', '.join(self.paths)})" if self.paths else "")


def prompt_codes(c, encodec, model_cfg, steps, dev):
    """The continuation's codes (n_q, P) and loudness: the last window of the audio file at most."""
    window = model_cfg.max_len / codec.FRAME_RATE
    try:
        wav = audio.load_audio(c["continue_from"], last_seconds=window)
    except Exception as e:
        raise UserError(f"cannot read --continue_from={c['continue_from']!r} ({settings.first_line(e)})") from None
    segments = codec.whole_segments(wav.shape[1])
    if segments == 0 or segments * codec.SEGMENT_STEPS >= steps:
        raise UserError(f"--continue_from must hold at least 1 s of audio and be shorter than --seconds={c['seconds']}")
    with torch.no_grad():
        [(codes, scales)] = codec.encode_clips(encodec, [wav[:, :codec.clip_samples(segments)].to(dev)])
    return codes, float(scales.median())


def main(argv):
    c = settings.parse_settings(globals(), argv)
    validate(c)
    common.check_writable(c["out"], "out")
    dev = common.pick_device(c["device"])
    rows = len(c["prompt"]) * c["num_samples"] * (2 if c["cfg"] != 1 else 1)
    check_device(c, dev)                        # before the model is loaded
    print(f"loading {c['ckpt']} (the model, its text encoder and codec) on {dev}", flush=True)
    session = Session.load(c["ckpt"], c["ema"], dev, weights_dtype(c["decode_dtype"], dev, rows), c["codec_weights"])
    c, line = session.sampling(c)
    print(line)
    session.check(c)
    if session.info["data"]["codec"].startswith("untrained"):
        print(f"NOTE: this model was trained on tokens of the untrained codec ({session.info['data']['codec']}): the audio "
              "will be noise, not music")
    job = Pieces(session, c)
    print(job.describe())
    if job.mode == "compile":
        print("the first steps compile the decoder: the bar starts after (seconds when torch's compile cache holds it, "
              "about a minute the first time on a CPU)")
    t0 = time.time()
    settings.stop_on_sigterm()
    with common.disk_errors(c["out"], "the files finished before it are intact"):
        try:
            with_a_bar(job)
        except KeyboardInterrupt:                  # Ctrl-C or SIGTERM: one line, no traceback
            raise settings.stopped(job.stopped()) from None
        except BaseException:
            print(f"\nstopped: {job.stopped()}", file=sys.stderr)
            raise
    for path in job.paths:
        print(f"wrote {path}")
    took = time.time() - t0
    print(f"{len(job.prompts)} × {c['seconds']:g} s in {took:.1f} s ({job.steps / took:.0f} steps/s, "
          f"{c['seconds'] / took:.2f}× real time)")
    return 0


def with_a_bar(job):
    """Run the job with a progress bar in seconds of audio, started when the first second is written (any
    compiling done, so its pace and time left are real); warnings wait until the bar is closed."""
    bar = None
    with warnings.catch_warnings(record=True) as caught:
        try:
            for seconds, _ in job:
                if bar is None:
                    bar = tqdm(total=job.samples / codec.SAMPLE_RATE, unit="s", dynamic_ncols=True, bar_format=
                               "{l_bar}{bar}| {n:.1f}/{total:.1f} s of audio [{elapsed}<{remaining}{postfix}]")
                    t0, first = time.time(), seconds
                bar.update(seconds - bar.n)
                if seconds > first:
                    bar.set_postfix_str(f"{(seconds - first) / max(1e-9, time.time() - t0):.2f}× real time")
        finally:
            if bar is not None:
                bar.close()            # closed before any word on how the run ended
    for warning in caught:
        warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
