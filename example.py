"""
The built-in example: the whole pipeline, offline, on a small synthetic dataset, in a few minutes on a CPU.

    python example.py                    # writes everything under example_run/ (replacing an earlier example run)

It synthesises labelled clips of chords, arpeggios and drum patterns ("upbeat major arpeggio",
"calm minor pad", ...), encodes them with compress.py, trains a tiny model with deploy.py, and
writes one MP3 per label with generate.py. It uses the pretrained Encodec when it can be loaded;
otherwise the untrained codec, and then the audio is noise, not music (it says so).
"""
import os
import sys

import settings  # first: Ctrl-C while the libraries below load then ends in one line, not a traceback
import numpy as np

from codec import load_codec
import common

SR = 48_000
KINDS = ("arpeggio", "pad", "drums")
MOODS = {("major", "fast"): "upbeat", ("major", "slow"): "calm", ("minor", "fast"): "driving", ("minor", "slow"): "melancholic"}


def synth_clip(kind="arpeggio", mode="major", tempo="fast", seconds=10.0, sr=SR, seed=0):
    """A stereo float32 clip (samples, 2) of simple music: chords, arpeggios or drums."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    out = np.zeros((n, 2))
    root = 110 * 2 ** (rng.integers(0, 12) / 12)
    chord = [0, 4, 7, 12] if mode == "major" else [0, 3, 7, 12]
    beat = 60 / (140 if tempo == "fast" else 70)
    if kind == "pad":
        for i, step in enumerate(chord[:3]):
            f = root * 2 ** (step / 12)
            out[:, i % 2] += 0.2 * np.sin(2 * np.pi * f * t) * (0.6 + 0.4 * np.sin(2 * np.pi * t / (8 * beat)))
        out[:, 1] += 0.1 * np.sin(2 * np.pi * root * 2 * t)
    else:
        for k, start in enumerate(np.arange(0, seconds, beat / 2)):
            i0 = int(start * sr)
            seg = t[: min(int(beat / 2 * sr), n - i0)]
            if kind == "arpeggio":
                f = 2 * root * 2 ** (chord[k % 4] / 12)
                note = np.sin(2 * np.pi * f * seg) + 0.3 * np.sin(4 * np.pi * f * seg)
                out[i0:i0 + len(seg)] += (0.3 * note * np.exp(-seg * 6))[:, None] * [0.7, 0.3] if k % 2 else \
                    (0.3 * note * np.exp(-seg * 6))[:, None] * [0.3, 0.7]
            else:  # drums: kick on beats, noise snare on off-beats
                if k % 2 == 0:
                    kick = np.sin(2 * np.pi * (50 + 100 * np.exp(-seg * 30)) * seg) * np.exp(-seg * 12)
                    out[i0:i0 + len(seg)] += 0.6 * kick[:, None]
                else:
                    out[i0:i0 + len(seg)] += 0.3 * (rng.standard_normal((len(seg), 2)) * np.exp(-seg * 25)[:, None])
    return (out / max(1e-9, np.abs(out).max()) * 0.8).astype(np.float32)


def label(kind, mode, tempo):
    return f"{MOODS[(mode, tempo)]} {mode} {kind}"


def make_dataset(folder, clips_per_label=3, seconds=10.0, seed=0):
    """Write WAV clips with a metadata.csv into `folder`; returns the list of labels."""
    import csv
    import soundfile as sf
    os.makedirs(folder, exist_ok=True)
    rows, i = [], 0
    for kind in KINDS:
        for (mode, tempo) in MOODS:
            for _ in range(clips_per_label):
                name = f"{kind}_{mode}_{tempo}_{i:03d}.wav"
                sf.write(os.path.join(folder, name), synth_clip(kind, mode, tempo, seconds, seed=seed + i), SR)
                rows.append((name, label(kind, mode, tempo)))
                i += 1
    with open(os.path.join(folder, "metadata.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("file", "text"), *rows])
    return sorted({r[1] for r in rows})


# -----------------------------------------------------------------------------
# settings: edit here, or override on the command line as --name=value
out = "example_run"         # everything goes under this folder
clips_per_label = 3         # 4 moods × 3 kinds × this many clips ...
clip_seconds = 10           # ... of this many seconds
steps = 300                 # training steps for the tiny model
seconds = 5.0               # length of each generated piece
codec = "auto"              # auto: pretrained Encodec if it loads, else the untrained one; or pretrained / untrained
codec_weights = ""          # a local encodec_48khz-7e698e3e.th, for a machine without internet (README: "Set-up")
# -----------------------------------------------------------------------------


MARKER = ".made-by-example.py"


def start_fresh(out, folders):
    """Each run starts from nothing, but only ever deletes what an earlier example.py made: the folders it
    creates, in a folder that carries its marker file."""
    import shutil
    if os.path.exists(out) and not os.path.exists(os.path.join(out, MARKER)):
        if not os.path.isdir(out) or os.listdir(out):
            raise settings.UserError(f"--out={out} already exists and was not made by example.py: choose another --out "
                                   "(example.py only deletes folders it made itself)")
    common.check_writable(out, "out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, MARKER), "w") as f:
        f.write("example.py's scratch folder: the next example.py run into it replaces music/, data/, run/ and samples/\n")
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv):
    import compress
    import deploy
    import generate
    c = settings.parse_settings(globals(), argv)
    settings.check_ranges(c, dict(clips_per_label="[1, 1000]", clip_seconds="[2, 600]", steps="[1, 1000000]", seconds="(0, 600]"))
    folders = music, data, run, samples = [os.path.join(c["out"], d) for d in ("music", "data", "run", "samples")]
    start_fresh(c["out"], folders)
    encodec, weights = c["codec"], [f"--codec_weights={c['codec_weights']}"] if c["codec_weights"] else []
    if encodec == "auto":
        try:
            load_codec("pretrained", c["codec_weights"])
            encodec = "pretrained"
        except SystemExit as e:
            reason = str(e.code).removeprefix("error: ").split(". Either")[0]
            print("NOTE: this demo uses the UNTRAINED encodec: the pipeline runs end to end, but the MP3s will sound like "
                  "noise, not music. For real audio, download the weights (README: Set-up) and run python example.py "
                  f"--codec_weights=PATH/encodec_48khz-7e698e3e.th\n(why: {reason})\n")
            encodec = "untrained"

    print(f"1/4 synthesising {4 * len(KINDS) * c['clips_per_label']} labelled clips in {music}")
    labels = make_dataset(music, c["clips_per_label"], seconds=c["clip_seconds"])
    print(f"2/4 compress.py → {data}")
    compress.main(["--input", music, "--output", data, f"--codec={encodec}", *weights, f"--clip_seconds={c['clip_seconds']}",
                   f"--min_seconds={min(5, c['clip_seconds'])}", "--num_workers=2", "--check_codec=4"])
    print(f"3/4 deploy.py --preset=tiny: a tiny model for {c['steps']} steps → {run}, with a few samples at the end on its page")
    deploy.main(["--data", data, "--out", run, "--preset=tiny", f"--max_steps={c['steps']}", f"--sample_interval={c['steps']}",
                 f"--sample_seconds={min(3.0, c['seconds'])}", f"--sample_prompts={'|'.join(labels[::len(labels) // 3][:3])}",
                 "--val_fraction=0.1", "--num_workers=2", *weights])
    print(f"4/4 generate.py: one piece per label → {samples}")
    generate.main(["--ckpt", os.path.join(run, "ckpt.pt"), "--out", samples, f"--seconds={c['seconds']}", *weights,
                   *[f"--prompt={label}" for label in labels]])
    print(f"\ndone. dataset: {music}  tokens: {data}  run (ckpt.pt, metrics.jsonl, loss.png): {run}  MP3s: {samples}\n"
          f"listen: open {os.path.join(run, 'index.html')} in a browser (curves, samples with players and spectrograms)"
          + ("\n(untrained encodec: the MP3s are noise by construction, see README.md)" if encodec == "untrained" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
