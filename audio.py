"""
Audio in and out, at the codec's 48 kHz stereo: one streamed reader for every format the bundled ffmpeg
decodes (soundfile where it reads well, ffmpeg's WAV stream otherwise), memory bounded by a block at any
length, seeking where only the end is wanted; MP3 and WAV written as they are made; spectrograms.
The codec itself (tokens ↔ audio) is in codec.py.
"""
import math
import os
import re
import subprocess
import tempfile
import warnings
from contextlib import suppress

import numpy as np
import torch

import common
from codec import CHANNELS, SAMPLE_RATE
from settings import UserError

# the names compress.py reads as audio: every format the bundled ffmpeg decodes that music comes in (and the
# audio of video containers); each file is then read by soundfile or ffmpeg (read_native)
AUDIO_EXTENSIONS = (".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".mp2", ".m4a", ".m4b", ".aac", ".alac",
                    ".mp4", ".m4v", ".mov", ".3gp", ".webm", ".weba", ".mka", ".mkv", ".aif", ".aiff", ".aifc", ".caf",
                    ".wma", ".asf", ".wv", ".ape", ".tta", ".mpc", ".ac3", ".eac3", ".dts", ".amr", ".au", ".snd", ".w64")


# -----------------------------------------------------------------------------
# audio in

def stream_48k(path, block_seconds=10.0, start=0.0):
    """Yield an audio file (any format read_native reads, any rate and channel count), from `start` seconds
    (read_native), as consecutive float32 (2, n) blocks at 48 kHz stereo. Memory is bounded by the block, not the file, and the blocks joined are
    sample for sample what resampling the whole file at once gives: each block is resampled with enough
    real context on both sides, starting at a multiple of the resampler's period."""
    blocks = read_native(path, block_seconds, start)
    sr, _ = next(blocks)
    if sr == SAMPLE_RATE:
        for block in blocks:
            yield _to_stereo(block)
        return
    import torchaudio.transforms as AT
    g = math.gcd(sr, SAMPLE_RATE)
    period, out_period = sr // g, SAMPLE_RATE // g          # every `period` inputs give `out_period` outputs
    resample = AT.Resample(sr, SAMPLE_RATE, dtype=torch.float32)   # the kernel torchaudio.functional.resample uses
    context = period * -(-512 // period)                    # > the resampling kernel's reach, a whole number of periods
    step = period * max(1, round(block_seconds * sr / period))
    buf, buf_start, start, total = torch.zeros(2, 0), 0, 0, 0

    def resampled(end, at_end):
        a = max(0, start - context)
        y = resample(buf[:, a - buf_start:(total if at_end else end + context) - buf_start])
        last = math.ceil(total * out_period / period) if at_end else end // period * out_period
        skip = (start - a) // period * out_period
        return y[:, skip:skip + last - start // period * out_period]

    for block in _rechunked(blocks, step):
        buf = torch.cat([buf, _to_stereo(block)], 1)
        total += block.shape[0]
        while total >= start + step + context:
            yield resampled(start + step, False)
            start += step
            keep = max(0, start - context)
            buf, buf_start = buf[:, keep - buf_start:], keep
    while start < total:
        end = min(start + step, total)
        yield resampled(end, end == total)
        start = end


def _rechunked(blocks, frames):
    """(n, C) blocks of any sizes → blocks of exactly `frames` (the last one shorter)."""
    pending, held = [], 0
    for block in blocks:
        pending.append(block)
        held += len(block)
        if held >= frames:
            joined = np.concatenate(pending)
            for i in range(0, len(joined) - frames + 1, frames):
                yield joined[i:i + frames]
            rest = joined[len(joined) // frames * frames:]
            pending, held = [rest], len(rest)
    if held:
        yield np.concatenate(pending)


def _soundfile_reads(path):
    """soundfile's description of the file, where libsndfile reads it well: not MP3, whose partial reads
    glitch at their edges in libsndfile; None otherwise."""
    import soundfile as sf
    try:
        info = sf.info(path)
    except Exception:
        return None
    return info if info.format != "MP3" and info.frames > 0 else None


def read_native(path, block_seconds=10.0, start=0.0):
    """The one reader of audio files. Yields (sample rate, channels) first, then float32 (frames, channels)
    blocks of about block_seconds at the file's own rate, from `start` seconds on (a negative start counts
    from the end): a seek, so that what comes before is not decoded. soundfile reads what libsndfile reads
    well (WAV, FLAC, Ogg, Opus, AIFF, ...); everything else ffmpeg can decode (MP3, M4A/AAC, WebM, WMA, the
    audio of a video, ...) comes from the bundled ffmpeg as a WAV stream, the first audio stream of the
    file. Memory is bounded by a block either way. A file neither can read raises ValueError with ffmpeg's
    reason."""
    info = _soundfile_reads(path)
    if info is not None:
        import soundfile as sf
        yield info.samplerate, info.channels
        with warnings.catch_warnings(), sf.SoundFile(path) as f:
            warnings.simplefilter("ignore")
            if start:
                f.seek(min(info.frames, max(0, round((start if start > 0 else info.duration + start) * info.samplerate))))
            while True:
                block = f.read(max(1, int(block_seconds * info.samplerate)), dtype="float32", always_2d=True)
                if not len(block):
                    return
                yield block
    seek = [] if not start else ["-ss", f"{start:.3f}"] if start > 0 else ["-sseof", f"{start:.3f}"]
    cmd = [ffmpeg_exe(), "-v", "error", "-nostdin", *seek, "-i", path, "-map", "0:a:0", "-vn", "-map_metadata", "-1",
           "-c:a", "pcm_f32le", "-f", "wav", "-"]
    with tempfile.TemporaryFile() as errors:            # a file, not a pipe: ffmpeg never waits on its messages
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors)
        try:
            rate, channels = _wav_header(proc.stdout)
            if rate is None:
                proc.wait()
                errors.seek(0)
                raise ValueError(_ffmpeg_reason(errors.read()))
            yield rate, channels
            width = 4 * channels
            frames = max(1, int(block_seconds * rate))
            while True:
                data = proc.stdout.read(frames * width)
                if len(data) >= width:
                    yield np.frombuffer(data[:len(data) // width * width], np.float32).reshape(-1, channels)
                if len(data) < frames * width:
                    break
            if proc.wait() != 0:
                errors.seek(0)
                raise ValueError(_ffmpeg_reason(errors.read()))
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()


def _wav_header(stream):
    """(sample rate, channels) from the head of a WAV stream, read up to its data chunk; (None, None) if
    the stream ends first (ffmpeg could not decode the file)."""
    import struct
    if stream.read(12)[8:12] != b"WAVE":
        return None, None
    rate = channels = None
    while True:
        head = stream.read(8)
        if len(head) < 8:
            return None, None
        kind, size = head[:4], struct.unpack("<I", head[4:])[0]
        if kind == b"data":
            return (rate, channels) if rate else (None, None)
        body = stream.read(size + size % 2)
        if kind == b"fmt ":
            channels, rate = struct.unpack("<HI", body[2:8])


def _ffmpeg_reason(message):
    lines = message.decode(errors="replace").strip().splitlines()
    return lines[-1].strip() if lines else "ffmpeg found no audio in it"


def audio_seconds(path):
    """The length of an audio file in seconds without decoding it: soundfile's header, else what ffmpeg says
    of the file (None where the file does not say). Raises ValueError with the reason for a file that holds
    no audio either can read."""
    info = _soundfile_reads(path)
    if info is not None:
        return info.duration
    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", path], capture_output=True, timeout=120)
    text = out.stderr.decode(errors="replace")
    if not re.search(r"Stream #\S+.*?: Audio: ", text):
        lines = [line.strip() for line in text.splitlines() if line.strip() and "output file" not in line]
        raise ValueError(lines[-1].replace(f"{path}: ", "") if lines else "no audio stream in it")
    duration = re.search(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)", text)
    return int(duration[1]) * 3600 + int(duration[2]) * 60 + float(duration[3]) if duration else None


def _to_stereo(block):
    """(frames, C) → (2, frames). Mono is duplicated; beyond two channels, the first two are kept as
    left/right and the rest mixed equally into both (a plain downmix)."""
    audio = block.T
    if audio.shape[0] == 1:
        audio = np.repeat(audio, 2, axis=0)
    elif audio.shape[0] > 2:
        audio = audio[:2] + 0.5 * audio[2:].mean(axis=0, keepdims=True)
    return torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))


def load_audio(path, last_seconds=None):
    """A whole file as (2, N) float32 at 48 kHz, or only its last `last_seconds`: read from a second before them
    (the resampler's context), never from the start of a long file."""
    keep = None if last_seconds is None else int(last_seconds * SAMPLE_RATE)
    out = torch.zeros(2, 0)
    for block in stream_48k(path, start=0.0 if last_seconds is None else -(last_seconds + 1.0)):
        out = torch.cat([out, block], 1)
        if keep is not None and out.shape[1] > 2 * keep:
            out = out[:, -keep:]
    return out if keep is None else out[:, -keep:]


# -----------------------------------------------------------------------------
# audio out

def ffmpeg_exe():
    import imageio_ffmpeg
    return imageio_ffmpeg.get_ffmpeg_exe()


class AudioWriter:
    """Writes 48 kHz stereo audio as it comes: write((2, n) float) appends, close() gives the file its final
    name. Until then it lives under `<name>.partial.<ext>`, a name that says so, which is what an interrupted
    run leaves behind. The final name never replaces an existing file (a number is added instead) unless
    overwrite=True. WAV: the header is rewritten after each append, so the file is always a valid WAV of what
    has been written; MP3: the samples go through the bundled ffmpeg, which writes MP3 frames as they come."""

    def __init__(self, path, fmt="mp3", bitrate="192k", overwrite=False):
        if fmt not in ("mp3", "wav"):
            raise UserError(f"format={fmt!r} is not supported; use mp3 or wav")
        self.path, self.fmt, self.overwrite, self.samples, self.finished = path, fmt, overwrite, 0, None
        stem, ext = os.path.splitext(path)
        for partial in common.numbered(f"{stem}.partial{ext}"):
            try:
                self.file = open(partial, "xb")       # claims the name: concurrent runs never share one
                break
            except FileExistsError:
                continue
        self.partial = partial
        if fmt == "wav":
            import wave
            self.wav = wave.open(self.file, "wb")
            self.wav.setnchannels(CHANNELS)
            self.wav.setsampwidth(2)
            self.wav.setframerate(SAMPLE_RATE)
        else:
            self.file.close()
            cmd = [ffmpeg_exe(), "-v", "error", "-nostdin", "-y", "-probesize", "32", "-analyzeduration", "0", "-f", "s16le", "-ar", str(SAMPLE_RATE), "-ac", str(CHANNELS),
                   "-i", "pipe:0", "-c:a", "libmp3lame", "-b:a", bitrate, "-flush_packets", "1", "-f", "mp3", partial]
            self.ffmpeg = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)

    def write(self, wav):
        pcm = (wav.detach().float().clamp(-1, 1).cpu().numpy().T * 32767).astype(np.int16)   # (n, 2)
        self.samples += pcm.shape[0]
        if self.fmt == "wav":
            self.wav.writeframes(pcm.tobytes())
            self.file.flush()
        else:
            try:
                self.ffmpeg.stdin.write(pcm.tobytes())
                self.ffmpeg.stdin.flush()
            except BrokenPipeError:
                self._ffmpeg_failed()

    def _ffmpeg_failed(self):
        message = self.ffmpeg.stderr.read().decode(errors="replace").strip().splitlines()
        raise UserError(f"ffmpeg could not write {self.partial}: {message[-1] if message else 'it stopped'}")

    def _finish_encoding(self):
        if self.fmt == "wav":
            self.wav.close()
            self.file.close()
        else:
            self.ffmpeg.stdin.close()
            if self.ffmpeg.wait() != 0:
                self._ffmpeg_failed()

    def close(self, meta=None):
        """Finish the file and give it its final name (returned). With meta, its `.json` is written first, beside
        the partial file, and renamed with it: a piece that has its final name has its .json."""
        self._finish_encoding()
        if meta is not None:
            common.write_json(self.partial + ".json", meta)
        if self.overwrite:
            os.replace(self.partial, self.path)
            final = self.path
        else:
            final = common.publish_new(self.partial, (p for p in common.numbered(self.path) if not os.path.exists(p + ".json")))
        if meta is not None:
            os.replace(self.partial + ".json", final + ".json")
        self.finished = final
        return final

    def abort(self):
        """Stop writing and keep what was written under its partial name (returned); a file with no audio
        in it yet is removed instead (None), and so is a .json written for it. A finished file: None."""
        if self.finished:
            return None
        with suppress(FileNotFoundError):
            os.remove(self.partial + ".json")
        try:
            self._finish_encoding()
        except (UserError, OSError, ValueError):
            pass
        if self.samples:
            return self.partial
        with suppress(FileNotFoundError):
            os.remove(self.partial)
        return None


def write_audio(path, wav, fmt="mp3", bitrate="192k", overwrite=True):
    """Write (2, N) float audio at 48 kHz as MP3 (through the bundled ffmpeg) or WAV, in one go. Returns the
    name written (see AudioWriter for overwrite=False)."""
    writer = AudioWriter(path, fmt, bitrate, overwrite)
    try:
        writer.write(wav)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def write_spectrogram(path, wav):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.specgram(wav.float().mean(0).cpu().numpy(), NFFT=2048, Fs=SAMPLE_RATE, noverlap=1536, cmap="magma")
    ax.set_xlabel("seconds"); ax.set_ylabel("Hz")
    with common.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


