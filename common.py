"""
Helpers shared by the scripts: command-line settings, audio in and out, the Encodec codec,
and writing files atomically. Each script keeps its own settings; only code lives here.
"""
import difflib
import functools
import json
import math
import os
import warnings
from contextlib import contextmanager

import numpy as np
import torch

SAMPLE_RATE = 48_000      # Encodec 48 kHz: everything is resampled to this
CHANNELS = 2              # ... and made stereo
FRAME_RATE = 150          # codec steps per second
SEGMENT_STEPS = 150       # the 48 kHz model codes audio in 1 s segments of 150 steps each ...
SEGMENT_STRIDE = 47_520   # ... that start every 0.99 s (1 % overlap, blended by overlap-add when decoding)
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")


class UserError(SystemExit):
    """A mistake in the input that the user can fix: one line on stderr, exit status 1, no traceback."""
    def __init__(self, message):
        super().__init__(f"error: {message}")


# -----------------------------------------------------------------------------
# settings: plain module-level variables, overridable as --name=value or --name value

def settings(namespace):
    """The editable settings of a script: its lower-case module-level bools, ints, floats, strings and lists."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and k.islower() and isinstance(v, (bool, int, float, str, list))}


def _parse_value(name, text, default):
    if isinstance(default, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{name} takes true or false, not {text!r}")
    for kind in (int, float):
        if isinstance(default, kind):
            try:
                return kind(text)
            except ValueError:
                try:  # allow 1e4 for an int setting when it is a whole number
                    value = float(text)
                    if kind is int and value.is_integer():
                        return int(value)
                except ValueError:
                    pass
                raise UserError(f"--{name} takes {'a whole number' if kind is int else 'a number'}, not {text!r}")
    return text


def parse_settings(defaults, argv, given=None):
    """Apply `--name=value` / `--name value` overrides to a copy of `defaults` (a dict from `settings`).
    List settings (e.g. prompt) collect every occurrence; a bare `--flag` sets a boolean to true.
    If `given` is a set, the names set on the command line are added to it."""
    config = dict(defaults)
    seen_lists = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise UserError(f"unexpected argument {arg!r}: settings are given as --name=value")
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name not in defaults:
            close = difflib.get_close_matches(name, defaults, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else f"; known settings: {', '.join(sorted(defaults))}"
            raise UserError(f"unknown setting --{name}{hint}")
        default = defaults[name]
        if not eq:
            if isinstance(default, bool) and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                value = "true"
            elif i + 1 < len(argv):
                i += 1
                value = argv[i]
            else:
                raise UserError(f"--{name} needs a value")
        if given is not None:
            given.add(name)
        if isinstance(default, list):
            if name not in seen_lists:    # the first --prompt replaces the default list
                config[name] = []
                seen_lists.add(name)
            config[name].append(value)
        else:
            config[name] = _parse_value(name, value, default)
        i += 1
    return config


# -----------------------------------------------------------------------------
# files

@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds,
    so a crash never leaves a half-written file where a good one was."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)


def distributed_env():
    """(rank, local_rank, world_size) from torchrun's environment variables; (0, 0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA GPU is visible; use --device=cpu")
    return name


# -----------------------------------------------------------------------------
# audio in

def read_audio(path):
    """Read any WAV/FLAC/OGG/MP3 as float32 (channels, samples) and its sample rate."""
    import soundfile as sf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    return np.ascontiguousarray(data.T), sr


def to_stereo_48k(audio, sr):
    """(C, N) at any rate → (2, M) at 48 kHz. Mono is duplicated; beyond two channels, the first two
    are kept as left/right and the rest mixed equally into both (a plain downmix)."""
    if audio.shape[0] == 1:
        audio = np.repeat(audio, 2, axis=0)
    elif audio.shape[0] > 2:
        audio = audio[:2] + 0.5 * audio[2:].mean(axis=0, keepdims=True)
    wav = torch.from_numpy(np.ascontiguousarray(audio))
    if sr != SAMPLE_RATE:
        import torchaudio.functional as AF
        wav = AF.resample(wav, sr, SAMPLE_RATE)
    return wav.clamp_(-1.0, 1.0)


# -----------------------------------------------------------------------------
# audio out

def ffmpeg_exe():
    import imageio_ffmpeg
    return imageio_ffmpeg.get_ffmpeg_exe()


def write_audio(path, wav, fmt="mp3", bitrate="192k"):
    """Write (2, N) float audio at 48 kHz as MP3 (through pydub and the bundled ffmpeg) or WAV, atomically."""
    pcm = (wav.detach().float().clamp(-1, 1).cpu().numpy().T * 32767).astype(np.int16)  # (N, 2)
    with atomic_path(path) as tmp:
        if fmt == "wav":
            import soundfile as sf
            sf.write(tmp, pcm, SAMPLE_RATE, format="WAV", subtype="PCM_16")
        elif fmt == "mp3":
            with warnings.catch_warnings():   # pydub warns at import that no system ffmpeg is on PATH
                warnings.simplefilter("ignore")
                from pydub import AudioSegment
            AudioSegment.converter = ffmpeg_exe()
            seg = AudioSegment(pcm.tobytes(), frame_rate=SAMPLE_RATE, sample_width=2, channels=pcm.shape[1])
            seg.export(tmp, format="mp3", bitrate=bitrate)
        else:
            raise UserError(f"format={fmt!r} is not supported; use mp3 or wav")


def write_spectrogram(path, wav):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.specgram(wav.float().mean(0).cpu().numpy(), NFFT=2048, Fs=SAMPLE_RATE, noverlap=1536, cmap="magma")
    ax.set_xlabel("seconds"); ax.set_ylabel("Hz")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


# -----------------------------------------------------------------------------
# the codec

def codec_name(codec, seed):
    """The string stored with the data that says which codec made the tokens."""
    return f"untrained:seed={seed}" if codec == "untrained" else "encodec_48khz"


def parse_codec_name(name):
    """Inverse of codec_name: 'untrained:seed=3' → ('untrained', 3), 'encodec_48khz' → ('pretrained', 0)."""
    if name.startswith("untrained:seed="):
        return "untrained", int(name.split("=", 1)[1])
    if name == "encodec_48khz":
        return "pretrained", 0
    raise UserError(f"unknown codec {name!r} in the data or checkpoint")


@functools.lru_cache(maxsize=4)
def load_codec(codec="pretrained", weights="", seed=0, bandwidth=6.0, device="cpu"):
    """Encodec 48 kHz in eval mode. codec: 'pretrained' (official weights, from `weights` when given,
    else downloaded by the encodec package) or 'untrained' (seeded random weights, for offline tests)."""
    from encodec import EncodecModel
    if codec == "untrained":
        model = _untrained_codec(seed)
    elif codec == "pretrained":
        model = EncodecModel.encodec_model_48khz(pretrained=False)
        try:
            state = torch.load(weights, map_location="cpu") if weights else _download_codec_weights()
            model.load_state_dict(state)
        except Exception as e:
            raise UserError(
                f"could not load the pretrained Encodec 48 kHz weights ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                "Either give a local copy with --codec_weights=PATH/encodec_48khz-7e698e3e.th, or use "
                "--codec=untrained (random codec: for tests and demos only, it will not sound like music)") from None
    else:
        raise UserError(f"codec={codec!r} is not known; use pretrained or untrained")
    model.set_target_bandwidth(bandwidth)
    return model.eval().to(device)


def _download_codec_weights():
    import socket
    url = "https://dl.fbaipublicfiles.com/encodec/v0/encodec_48khz-7e698e3e.th"
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)   # a firewalled machine fails in a minute instead of hanging
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, progress=False)
    finally:
        socket.setdefaulttimeout(previous)


def _calibration_audio(seed, seconds=12):
    """Seeded pseudo-music (harmonic notes, chords, noise bursts at varied loudness): the same on every
    machine, and independent of any user data. Used to place the untrained codec's codebooks."""
    g = torch.Generator().manual_seed(seed)
    n = seconds * SAMPLE_RATE
    t = torch.arange(n, dtype=torch.float64) / SAMPLE_RATE
    out = torch.zeros(2, n, dtype=torch.float64)
    note = SAMPLE_RATE // 4
    for start in range(0, n, note):
        length = min(note * int(torch.randint(1, 5, (1,), generator=g)), n - start)
        env = torch.exp(-torch.linspace(0, float(torch.rand(1, generator=g)) * 8, length, dtype=torch.float64))
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            f0 = 55.0 * 2 ** (float(torch.rand(1, generator=g)) * 6)
            tone = sum(torch.sin(2 * math.pi * f0 * h * t[start:start + length]) / h for h in range(1, 6))
            pan = float(torch.rand(1, generator=g))
            out[0, start:start + length] += env * tone * pan
            out[1, start:start + length] += env * tone * (1 - pan)
        if float(torch.rand(1, generator=g)) < 0.4:
            noise = torch.randn(2, length, generator=g, dtype=torch.float64)
            out[:, start:start + length] += noise * env * float(torch.rand(1, generator=g))
    loud = torch.exp(torch.randn(n // SAMPLE_RATE + 1, generator=g, dtype=torch.float64))
    out *= loud.repeat_interleave(SAMPLE_RATE)[:n]
    return (out / out.abs().max()).float()


def _untrained_codec(seed):
    """Encodec 48 kHz with seeded random weights and usable codebooks: each residual codebook is set to
    1024 encoder outputs (residuals) of seeded calibration audio, pulled halfway toward their mean so that
    audio unlike the calibration still spreads over many codes (about 500 per codebook on music)."""
    from encodec import EncodecModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EncodecModel.encodec_model_48khz(pretrained=False)
    model.eval()
    audio = _calibration_audio(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        segments = audio[:, :audio.shape[1] // SAMPLE_RATE * SAMPLE_RATE].reshape(2, -1, SAMPLE_RATE).transpose(0, 1)
        scale = segments.mean(1, keepdim=True).pow(2).mean(2, keepdim=True).sqrt() + 1e-8
        residual = model.encoder(segments / scale)                    # (S, 128, 150)
        residual = residual.transpose(1, 2).reshape(-1, residual.shape[1])  # (S*150, 128)
        for layer in model.quantizer.vq.layers:
            book = layer._codebook
            pick = torch.randperm(residual.shape[0], generator=g)[:book.codebook_size]
            mean = residual.mean(0)
            entries = mean + 0.5 * (residual[pick] - mean)
            book.embed.copy_(entries)
            book.embed_avg.copy_(entries)
            book.inited.fill_(1)
            residual = residual - book.dequantize(book.quantize(residual))
    return model


def encode_clips(codec, wav):
    """wav (B, 2, clip_samples(S)) → codes (B, n_q, 150*S) int64 and scales (B, S): the encodec package's
    own model.encode, its S full 1 s segments joined (the 480-sample tail it also returns is dropped)."""
    frames = codec.encode(wav)[:whole_segments(wav.shape[-1])]
    codes = torch.cat([c for c, _ in frames], dim=-1)
    scales = torch.cat([s for _, s in frames], dim=-1)
    return codes, scales


def decode_codes(codec, codes, scales):
    """codes (B, n_q, T), scales (B, ceil(T/150)) → audio (B, 2, N): the codec's own decode, segment by
    segment with its overlap-add. T need not be a whole number of segments."""
    frames = [(codes[..., i:i + SEGMENT_STEPS], scales[:, j:j + 1])
              for j, i in enumerate(range(0, codes.shape[-1], SEGMENT_STEPS))]
    return codec.decode(frames)


def clip_samples(segments):
    """Samples of audio that the codec turns into exactly `segments` full segments (150 steps each)."""
    return (segments - 1) * SEGMENT_STRIDE + SAMPLE_RATE


def whole_segments(samples):
    """How many full codec segments fit in `samples` of audio (0 below 1 s): the inverse of clip_samples."""
    return (samples - SAMPLE_RATE) // SEGMENT_STRIDE + 1 if samples >= SAMPLE_RATE else 0
