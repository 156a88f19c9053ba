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

import common  # first: Ctrl-C while the libraries below load then ends in one line, not a traceback
import torch
from tqdm import tqdm

import model as M
from common import UserError

# -----------------------------------------------------------------------------
# settings: edit here, or override on the command line as --name=value
ckpt = "runs/music/ckpt.pt"  # checkpoint written by deploy.py (or its run folder), or a folder written by export.py
ema = True                   # use the checkpoint's EMA weights (false: the raw weights of its last step)
prompt = []                  # text descriptions; repeat --prompt for several (generated together as one batch)
seconds = 10.0               # length of each piece (with --continue_from: including the prompt audio)
num_samples = 1              # pieces per prompt
top_k = 250                  # sample among the k most likely codes (1..1024)
top_p = 1.0                  # ... and within this probability mass (1.0: off)
temperature = 1.0            # < 1: safer, > 1: wilder
cfg = 3.0                    # classifier-free guidance strength (1.0: off)
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


def validate(c):
    """Every input check that needs no model, so mistakes fail in a second."""
    if not c["prompt"]:
        raise UserError('no prompt: give at least one, e.g. --prompt="chill lofi, relaxed", and the model with '
                        f'--ckpt=RUN_FOLDER (deploy.py\'s --out, or its ckpt.pt, or a folder of export.py){found_here()}')
    if not os.path.exists(c["ckpt"]):
        raise UserError(f"no model at --ckpt={c['ckpt']}: give a run folder of deploy.py (its --out), its ckpt.pt, or a "
                        f"folder written by export.py{found_here()}")
    common.check_ranges(c, dict(seconds="(0, 36000]", num_samples="[1, 1000]", top_k="[1, 1024]", top_p="(0, 1]",
                                temperature="[0.01, 100]", cfg="[1, 100]", gain_db="[-60, 60]", seed="[0, 9.2e18]",
                                window_stride="(0, 36000]"))
    if round(c["seconds"] * common.FRAME_RATE) < 1:
        raise UserError(f"seconds={c['seconds']} is shorter than one codec step (1/{common.FRAME_RATE} s): ask for more")
    for name, allowed in (("format", ("mp3", "wav")), ("decode", ("auto", "eager", "compile", "graph")),
                          ("decode_dtype", ("auto", "float32", "bfloat16"))):
        if c[name] not in allowed:
            raise UserError(f"{name}={c[name]!r}: use {' or '.join(allowed)}")
    if c["continue_from"]:
        if not os.path.isfile(c["continue_from"]):
            raise UserError(f"cannot read --continue_from={c['continue_from']!r}: no such file")
        try:
            seconds = common.audio_seconds(c["continue_from"])
        except (ValueError, OSError) as e:
            raise UserError(f"cannot read --continue_from={c['continue_from']!r} as audio ({str(e).strip().splitlines()[0][:120]})") from None
        if seconds is not None and seconds < 1:
            raise UserError(f"--continue_from={c['continue_from']!r} holds {seconds:.2f} s of audio: give at least 1 s")


def found_here():
    """The run folders under ./runs and the demo's, to name in a message about --ckpt."""
    import glob
    runs = sorted(os.path.dirname(p) for p in glob.glob("runs/*/ckpt.pt") + glob.glob("example_run/run/ckpt.pt"))
    return f"; here: {', '.join(runs[:5])}" if runs else ""


def decoding_setup(c, dev):
    """(mode, dtype) for decoding: a CUDA graph on a GPU, eager on a CPU, compiled for long pieces (see
    model.decode_mode). Weights (BENCHMARKS.md; bf16 moves the logits by at most 0.014): bf16 on a GPU (as
    fast or faster on an H200); on a CPU bf16 while a step has at most 8 rows (prompts × samples, twice
    with guidance), where reading the weights dominates (1.3-1.6× faster at 1-2 rows), float32 above, where
    this CPU's bf16 arithmetic, widened to fp32, made it slower (10-15 % at 24 rows)."""
    cuda = dev.startswith("cuda")
    mode = M.decode_mode(c["decode"], dev, round(c["seconds"] * common.FRAME_RATE))
    if mode == "graph" and not cuda:
        raise UserError("decode=graph needs a CUDA GPU: use --decode=eager (or auto)")
    rows = len(c["prompt"]) * c["num_samples"] * (2 if c["cfg"] != 1 else 1)
    dtype = c["decode_dtype"] if c["decode_dtype"] != "auto" else "bfloat16" if cuda or rows <= 8 else "float32"
    return mode, getattr(torch, dtype)


def prompt_codes(c, codec, model_cfg, steps, dev):
    """The continuation's codes (n_q, P) and loudness: the last window of the audio file at most."""
    window = model_cfg.max_len / common.FRAME_RATE
    try:
        wav = common.load_audio(c["continue_from"], last_seconds=window)
    except Exception as e:
        raise UserError(f"cannot read --continue_from={c['continue_from']!r} ({str(e).strip().splitlines()[0][:120]})") from None
    segments = common.whole_segments(wav.shape[1])
    if segments == 0 or segments * common.SEGMENT_STEPS >= steps:
        raise UserError(f"--continue_from must hold at least 1 s of audio and be shorter than --seconds={c['seconds']}")
    with torch.no_grad():
        [(codes, scales)] = common.encode_clips(codec, [wav[:, :common.clip_samples(segments)].to(dev)])
    return codes, float(scales.median())


def main(argv):
    c = common.parse_settings(globals(), argv)
    validate(c)
    common.check_writable(c["out"], "out")
    dev = common.pick_device(c["device"])
    mode, dtype = decoding_setup(c, dev)
    model, info = M.load_model(c["ckpt"], ema=c["ema"])
    model_cfg = model.cfg
    if c["cfg"] != 1 and info["cond_dropout"] <= 0:
        raise UserError("this model was trained with cond_dropout=0, so it has no unconditional mode: use --cfg=1")
    model.for_decoding(dev, dtype)
    text_encoder = M.TextEncoder(info["text_encoder"], dev)
    data_info = info["data"]
    codec = common.codec_for(data_info, c["codec_weights"], dev)
    if data_info["codec"].startswith("untrained"):
        print(f"NOTE: this model was trained on tokens of the untrained codec ({data_info['codec']}): the audio will be noise, not music")

    steps, samples = common.steps_for(c["seconds"])     # exactly the length asked, to the sample
    prompts = [p for p in c["prompt"] for _ in range(c["num_samples"])]
    codes = torch.full((len(prompts), model_cfg.n_q, steps), M.UNKNOWN, dtype=torch.long, device=dev)
    scale = data_info["typical_scale"]
    if c["continue_from"]:
        given, scale = prompt_codes(c, codec, model_cfg, steps, dev)
        codes[..., :given.shape[-1]] = given
    names = [name + (f"_{i}" if c["num_samples"] > 1 else "") for name in common.file_names(c["prompt"]) for i in range(c["num_samples"])]
    paths = [os.path.join(c["out"], f"{name}.{c['format']}") for name in names]
    os.makedirs(c["out"], exist_ok=True)
    stride = round(c["window_stride"] * common.FRAME_RATE)
    stride = stride if stride < model_cfg.max_len else model_cfg.max_len * 3 // 5
    carry_on = model_cfg.positions == "relative" and model_cfg.attention == "favor"
    print(f"{len(prompts)} × {c['seconds']:g} s, decoding {mode} in {str(dtype).removeprefix('torch.')} on {dev}; "
          + ("the state carries on at any length" if carry_on or steps <= model_cfg.max_len else
             f"past {model_cfg.max_len / common.FRAME_RATE:g} s by windows, a new one every {stride / common.FRAME_RATE:g} s"))
    if mode == "compile":
        print("the first step compiles the decoder: the bar waits for it (seconds when torch's compile cache holds it, "
              "about a minute the first time on a CPU)")

    t0 = time.time()
    common.stop_on_sigterm()
    with common.disk_errors(c["out"], "the files finished before it are intact"):
        writers = [common.AudioWriter(p, c["format"], c["bitrate"], c["overwrite"]) for p in paths]
        try:
            stream_pieces(model, text_encoder, prompts, codes, codec, scale, writers, c, stride, mode, samples)
            for i, (p, writer) in enumerate(zip(prompts, writers)):
                meta = dict(prompt=p, seed=c["seed"], batch_index=i, batch_prompts=prompts, seconds=samples / common.SAMPLE_RATE,
                            samples=samples, steps=steps,
                            top_k=c["top_k"], top_p=c["top_p"], temperature=c["temperature"], cfg=c["cfg"],
                            window_stride=c["window_stride"], gain_db=c["gain_db"], scale=scale,
                            continue_from=c["continue_from"], format=c["format"], decode=mode, decode_dtype=str(dtype),
                            ckpt=os.path.abspath(c["ckpt"]), ckpt_step=info["step"], weights=info["weights"],
                            codec=data_info["codec"], sample_rate=common.SAMPLE_RATE, codes=codes[i].tolist())
                path = writer.close(meta)      # finished with its .json, or not at all
                if c["spectrogram"]:
                    with common.disk_errors(path + ".png", f"{path} and its .json are finished"):
                        common.write_spectrogram(path + ".png", common.load_audio(path))
                print(f"wrote {path}")
        except BaseException as e:
            kept = [path for path in (w.abort() for w in writers) if path]
            where = f"the audio made so far is kept in {', '.join(kept)}" if kept else "no audio had been made yet, so no file was left"
            finished = [w.finished for w in writers if w.finished]
            where += f" (finished before it: {', '.join(finished)})" if finished else ""
            if isinstance(e, KeyboardInterrupt):         # Ctrl-C or SIGTERM: that line, no traceback
                raise common.stopped(where) from None
            print(f"\nstopped: {where}", file=sys.stderr)
            raise
    took = time.time() - t0
    print(f"{len(prompts)} × {c['seconds']:g} s in {took:.1f} s ({steps / took:.0f} steps/s, "
          f"{c['seconds'] / took:.2f}× real time)")
    return 0


def stream_pieces(model, text_encoder, prompts, codes, codec, scale, writers, c, stride, mode, samples):
    """Sample the codes and append each second of audio to every writer as soon as it exists, `samples` in all."""
    stream = common.SegmentStream(codec, scale)
    gain = 10 ** (c["gain_db"] / 20)
    decoded, written, steps = 0, 0, codes.shape[-1]

    def write(audio):
        nonlocal written
        audio = audio[..., :samples - written]
        for writer, wav in zip(writers, audio.cpu() * gain):
            writer.write(wav)
        written += audio.shape[-1]
        if bar is not None:
            bar.update(audio.shape[-1] / common.SAMPLE_RATE)
            bar.set_postfix_str(f"{(bar.n - bar.initial) / max(1e-9, time.time() - bar.start_t):.2f}× real time")

    sampler = M.generate(model, text_encoder, prompts, codes, seed=c["seed"], top_k=c["top_k"], top_p=c["top_p"],
                         temperature=c["temperature"], cfg=c["cfg"], stride=stride, mode=mode)
    given = int((codes[0, 0] != M.UNKNOWN).sum())
    bar = None
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:   # nothing printed into the bar
        try:
            for start, end in sampler:
                if bar is None and end >= given + 2:   # the first steps sampled: any compiling is done, the pace is real
                    bar = tqdm(total=samples / common.SAMPLE_RATE, initial=written / common.SAMPLE_RATE, unit="s",
                               dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s of audio "
                               "[{elapsed}<{remaining}{postfix}]")
                while end - decoded >= common.SEGMENT_STEPS or (end == steps and decoded < steps):
                    write(stream.push(codes[..., decoded:decoded + common.SEGMENT_STEPS]))
                    decoded = min(steps, decoded + common.SEGMENT_STEPS)
            if stream.tail is not None:
                write(stream.finish())
        finally:
            if bar is not None:
                bar.close()            # closed before any word on how the run ended
    for warning in caught:
        warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
