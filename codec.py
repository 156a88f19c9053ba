"""
The codec: Encodec 48 kHz, its frame and segment constants, loading it (pretrained, local weights, or the
untrained one for tests and demos), encoding clips in batches and decoding codes, also one segment at a
time as they are made. Audio files are read and written in audio.py.

Encodec 48 kHz codes stereo audio in 1 s segments of 150 steps that start every 0.99 s (1 % overlap,
blended by overlap-add when decoding); each segment is normalised by its own loudness (its scale).
"""
import functools
import math
import os

import torch

import common
from settings import UserError, first_line

SAMPLE_RATE = 48_000      # Encodec 48 kHz: everything is resampled to this
CHANNELS = 2              # ... and made stereo
FRAME_RATE = 150          # codec steps per second
SEGMENT_STEPS = 150       # the 48 kHz model codes audio in 1 s segments of 150 steps each ...
SEGMENT_STRIDE = 47_520   # ... that start every 0.99 s (1 % overlap, blended by overlap-add when decoding)
HOP = SAMPLE_RATE // FRAME_RATE   # samples per codec step (320)


# -----------------------------------------------------------------------------
# loading

def codec_name(codec, seed):
    """The string stored with the data that says which codec made the tokens."""
    return f"untrained:seed={seed}" if codec == "untrained" else "encodec_48khz"


def codec_for(data_info, weights, device):
    """The codec that made a model's training data (pretrained, local weights, or untrained with its seed)."""
    kind, codec_seed = parse_codec_name(data_info["codec"])
    bandwidth = data_info["n_q"] * FRAME_RATE * 10 / 1000
    return load_codec(kind, weights or data_info.get("codec_weights", ""), codec_seed, bandwidth, device)


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
            state = torch.load(weights, map_location="cpu", weights_only=True) if weights else _download_codec_weights()
            model.load_state_dict(state)
        except Exception as e:
            import pickle
            reason = ("it is not a file of plain tensors" if isinstance(e, pickle.UnpicklingError)
                      else f"{type(e).__name__}: {first_line(e, 200)}")
            raise UserError(
                f"could not load the pretrained Encodec 48 kHz weights{' from ' + weights if weights else ''} ({reason}). "
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
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, progress=False, weights_only=True)
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
    books = [layer._codebook for layer in model.quantizer.vq.layers]
    # the calibration takes seconds on a CPU: its result is kept in a cache (a pure function of the seed)
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "music-transformer",
                         f"untrained-codec-{seed}-torch{torch.__version__}.pt")
    try:
        for book, entries in zip(books, torch.load(cache, weights_only=True)):
            book.embed.copy_(entries)
            book.embed_avg.copy_(entries)
            book.inited.fill_(1)
        return model
    except Exception:
        pass
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
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with common.atomic_path(cache) as tmp:
            torch.save([book.embed.clone() for book in books], tmp)
    except OSError:
        pass          # no cache: the next run calibrates again
    return model


# -----------------------------------------------------------------------------
# encoding and decoding

def encode_clips(codec, clips, batched=False, per_call=64, progress=None):
    """Clips (a list of (2, clip_samples(S)) tensors, any lengths) → [(codes (n_q, 150·S), scales (S,))], as
    the encodec package's model.encode gives them: each 1 s segment (one every 0.99 s) is normalised by its
    own loudness and encoded on its own. The loudness is taken clip by clip, so it never depends on what
    else is in the batch (the package's batched reduction can differ in the last bit).
    batched=False: the package's loop, one segment position at a time across the clips of equal length;
    batched=True: all segments of all clips together, per_call at a time: fewer, larger calls for a GPU.
    progress(clip indices, seconds) is called after each codec call: a segment of each of those clips is
    encoded, each `seconds` of their audio."""
    normalised, scales, owner = [], [], []        # owner: (clip, segment) of each normalised segment
    codes = {}
    step = SEGMENT_STRIDE / SAMPLE_RATE
    for length in sorted({c.shape[-1] for c in clips}):
        same = [i for i, c in enumerate(clips) if c.shape[-1] == length]
        x = torch.stack([clips[i] for i in same])                      # (B, 2, L)
        for j in range(whole_segments(length)):
            frame = x[:, :, j * SEGMENT_STRIDE:j * SEGMENT_STRIDE + SAMPLE_RATE]
            scale = torch.cat([1e-8 + f.mean(dim=1, keepdim=True).pow(2).mean(dim=2, keepdim=True).sqrt()
                               for f in frame.split(1)])               # (B, 1, 1), one clip at a time
            scales.append(scale.view(-1))
            owner += [(i, j) for i in same]
            if batched:
                normalised.append(frame / scale)
            else:
                codes[j, length] = _quantise(codec, frame / scale)
                if progress:
                    progress(same, step)
    if batched:
        parts = torch.cat(normalised).split(per_call)
        found = []
        for k, part in enumerate(parts):
            found.append(_quantise(codec, part))
            if progress:
                progress([i for i, _ in owner[k * per_call:(k + 1) * per_call]], step)
        found = torch.cat(found)
    else:
        found = torch.cat([codes[key] for key in sorted(codes, key=lambda k: (k[1], k[0]))])
    out = [[None] * whole_segments(c.shape[-1]) for c in clips]
    for (i, j), code, scale in zip(owner, found, torch.cat(scales)):
        out[i][j] = (code, scale)
    return [(torch.cat([c for c, _ in segs], -1), torch.stack([s for _, s in segs])) for segs in out]


def _quantise(codec, x):
    """Normalised segments (N, 2, 48000) → codes (N, n_q, 150): the codec's encoder and quantiser."""
    return codec.quantizer.encode(codec.encoder(x), codec.frame_rate, codec.bandwidth).transpose(0, 1)


class SegmentStream:
    """Decodes codes one segment (up to 150 steps, 1 s) at a time, as they are made, with the codec's own
    linear overlap-add: push() returns the samples no later segment can change, finish() the rest. Joined,
    they equal the package's decode of all the codes at once, sample for sample, and memory stays that of
    one segment at any length."""

    def __init__(self, codec, scale=None):
        self.codec, self.scale = codec, scale
        self.tail = self.tail_weight = None                 # the last segment's part the next one overlaps
        self.weight = None

    def push(self, codes, scale=None):
        """codes (B, n_q, n ≤ 150), at the loudness `scale` (B,) (default: the stream's one number) →
        finished audio (B, 2, samples)."""
        scale = torch.as_tensor(self.scale if scale is None else scale, dtype=torch.float32, device=codes.device)
        scale = scale.expand(codes.shape[0]).reshape(-1, 1)
        # the package decodes each segment on its own (its _decode_frame), then overlap-adds them
        frame = self.codec._decode_frame((codes, scale))
        if self.weight is None:                             # encodec's triangle, over a full segment
            t = torch.linspace(0, 1, SAMPLE_RATE + 2, device=frame.device, dtype=frame.dtype)[1:-1]
            self.weight = 0.5 - (t - 0.5).abs()
        n, overlap = frame.shape[-1], SAMPLE_RATE - SEGMENT_STRIDE
        weighted = self.weight[:n] * frame
        head = min(n, overlap)
        if self.tail is not None:                           # (earlier + this) / (their weights), in the package's order
            done = [(self.tail[..., :head] + weighted[..., :head]) / (self.tail_weight[:head] + self.weight[:head])]
        else:
            done = [weighted[..., :head] / self.weight[:head]]
        keep = SEGMENT_STRIDE if n > SEGMENT_STRIDE else n    # a full segment's end waits for the next one
        done.append(weighted[..., head:keep] / self.weight[head:keep])
        self.tail, self.tail_weight = (weighted[..., keep:], self.weight[keep:n]) if keep < n else (None, None)
        return torch.cat(done, -1)

    def finish(self):
        """The end of the last segment: (B, 2, samples), empty if there is none."""
        if self.tail is None:
            return torch.zeros(0)
        out, self.tail = self.tail / self.tail_weight, None
        return out


def decode_codes(codec, codes, scales):
    """codes (B, n_q, T) → audio (B, 2, N): the codec's own decode, segment by segment with its overlap-add
    (through SegmentStream, which also takes a last segment shorter than the overlap). scales: one loudness
    for everything, or (B, ceil(T / 150)) per segment."""
    stream = SegmentStream(codec, scales if not torch.is_tensor(scales) else None)
    parts = [stream.push(codes[..., i:i + SEGMENT_STEPS], scales[:, j] if torch.is_tensor(scales) else None)
             for j, i in enumerate(range(0, codes.shape[-1], SEGMENT_STEPS))]
    return torch.cat(parts + ([stream.finish()] if stream.tail is not None else []), -1)


# -----------------------------------------------------------------------------
# steps, segments and samples

def decoded_samples(steps):
    """Samples of audio that `steps` codec steps decode to: whole segments of 150 steps overlap (150 steps make
    1 s, 300 make 1.99 s), and a last partial segment of k steps adds k · 320 samples."""
    whole, rest = divmod(steps, SEGMENT_STEPS)
    return whole * SEGMENT_STRIDE + rest * HOP if rest else clip_samples(whole)


def steps_for(seconds):
    """(steps, samples) for a piece of `seconds`: the fewest codec steps whose audio lasts at least that long,
    and the samples that are exactly that long (the audio beyond them is cut)."""
    samples = max(1, round(seconds * SAMPLE_RATE))
    steps = -(-samples // HOP)                    # a lower bound: overlaps only shorten the audio
    while decoded_samples(steps) < samples:
        steps += 1
    return steps, samples


def clip_samples(segments):
    """Samples of audio that the codec turns into exactly `segments` full segments (150 steps each)."""
    return (segments - 1) * SEGMENT_STRIDE + SAMPLE_RATE


def whole_segments(samples):
    """How many full codec segments fit in `samples` of audio (0 below 1 s): the inverse of clip_samples."""
    return (samples - SAMPLE_RATE) // SEGMENT_STRIDE + 1 if samples >= SAMPLE_RATE else 0


