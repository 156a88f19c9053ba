"""
Generate music from text with a trained checkpoint.

    python generate.py --ckpt=runs/lofi/ckpt.pt --prompt="chill lofi, relaxed" --seconds=10
    python generate.py --ckpt=runs/lofi/ckpt.pt --prompt="calm piano" --prompt="upbeat drums" --num_samples=2
    python generate.py --ckpt=runs/lofi/ckpt.pt --prompt="jazz" --continue_from=intro.wav --seconds=20

Writes one MP3 (or WAV) per prompt and sample into --out, each with a .json of every setting used.
Tokens come from the model's recurrent state: one prefill, then constant cost per step.
"""
import math
import os
import re
import sys
import time

import torch
from tqdm import tqdm

import common
import model as M
from common import UserError

# -----------------------------------------------------------------------------
# settings: edit here, or override on the command line as --name=value
ckpt = "runs/music/ckpt.pt"  # checkpoint written by deploy.py
prompt = []                  # text descriptions; repeat --prompt for several (generated together as one batch)
seconds = 10.0               # length of each piece (with --continue_from: including the prompt audio)
num_samples = 1              # pieces per prompt
top_k = 250                  # sample among the k most likely codes (1..1024)
top_p = 1.0                  # ... and within this probability mass (1.0: off)
temperature = 1.0            # < 1: safer, > 1: wilder
cfg = 3.0                    # classifier-free guidance strength (1.0: off)
seed = 0                     # the same seed gives the same audio
out = "samples"              # output folder
format = "mp3"               # mp3 or wav
bitrate = "192k"             # MP3 bitrate
gain_db = 0.0                # loudness change applied after decoding
spectrogram = False          # also write a spectrogram .png beside each file
continue_from = ""           # an audio file to continue (MusicGen-style continuation)
overwrite = False            # replace earlier pieces of the same name (otherwise a number is added: name_1.mp3)
codec_weights = ""           # local Encodec weights (pretrained codec without internet)
device = "auto"              # auto (cuda when available), cpu, cuda
# -----------------------------------------------------------------------------


def slug(text, limit=60):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "unconditional"


def sample_next(logits, top_k, top_p, temperature, generator):
    """logits (..., V) → sampled ids (...), with top-k, then top-p, at the given temperature."""
    logits = logits.float() / temperature
    if top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p          # keep the smallest set that reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.flatten(0, -2), 1, generator=generator).view(probs.shape[:-1])


@torch.no_grad()
def sample_codes(model, text_encoder, prompts, steps, device, seed=0, top_k=250, top_p=1.0, temperature=1.0,
                 cfg=1.0, prompt_codes=None, refeed=False, progress=True):
    """Generate codes (B, n_q, steps) for a batch of prompts. prompt_codes (n_q, P) are kept as the first
    P steps (continuation). refeed=True runs the whole sequence through the model at every step instead
    of using the recurrent state (the slow reference method; the same codes for the same random stream)."""
    model.eval()
    n_q, vocab, pattern = model.cfg.n_q, model.cfg.vocab, model.cfg.pattern
    b = len(prompts)
    known = torch.full((b, n_q, steps), M.UNKNOWN, dtype=torch.long, device=device)
    if prompt_codes is not None:
        known[..., :prompt_codes.shape[-1]] = prompt_codes.to(device)
    layout = M.to_layout(known, pattern)              # START: empty slot, UNKNOWN: to sample, >= 0: given
    guided = cfg != 1.0
    text, mask = text_encoder(list(prompts) + [""] * b if guided else list(prompts), device)
    double = (lambda x: torch.cat([x, x])) if guided else (lambda x: x)
    first = int((layout == M.UNKNOWN).any(0).any(0).nonzero()[0])   # the first step with anything to sample
    generator = torch.Generator(device).manual_seed(seed)

    def logits_for(t):  # re-feeding: the whole sequence so far, for the logits of target t
        return model(double(M.inputs_from_targets(layout, vocab)[..., :t + 1]), text, mask)[:, :, -1]

    if refeed:
        logits = logits_for(first)
    else:
        logits, state = model.prefill(double(M.inputs_from_targets(layout, vocab)[..., :first + 1]), text, mask)
    total = layout.shape[-1]
    for t in tqdm(range(first, total), unit="step", disable=not progress, dynamic_ncols=True):
        if guided:
            cond, uncond = logits.float().chunk(2)
            logits = uncond + cfg * (cond - uncond)
        slot = layout[..., t]
        new = sample_next(logits, top_k, top_p, temperature, generator)
        layout[..., t] = torch.where(slot == M.UNKNOWN, new, slot)   # given codes and empty slots stay
        if t + 1 < total:
            if refeed:
                logits = logits_for(t + 1)
            else:
                logits = model.step(double(layout[..., t].masked_fill(layout[..., t] < 0, vocab)), state)
    return M.from_layout(layout, pattern, steps)


def codes_to_audio(codec, codes, scale, gain_db=0.0):
    """codes (B, n_q, T) → list of (2, N) waveforms, decoded segment by segment at the given loudness scale."""
    scales = torch.full((codes.shape[0], math.ceil(codes.shape[-1] / common.SEGMENT_STEPS)), float(scale), device=codes.device)
    with torch.no_grad():
        wav = common.decode_codes(codec, codes.to(next(codec.parameters()).device), scales.to(next(codec.parameters()).device))
    return list(wav.cpu() * 10 ** (gain_db / 20))


def codec_for(data_info, weights, device):
    """The codec that made the training data (pretrained, local weights, or untrained with its seed)."""
    kind, codec_seed = common.parse_codec_name(data_info["codec"])
    bandwidth = data_info["n_q"] * common.FRAME_RATE * 10 / 1000
    return common.load_codec(kind, weights or data_info.get("codec_weights", ""), codec_seed, bandwidth, device)


def validate(c):
    """Every input check that needs no model, so mistakes fail in a second."""
    if not c["prompt"]:
        raise UserError('no prompt: give at least one, e.g. --prompt="chill lofi, relaxed"')
    common.check_ranges(c, dict(seconds="(0, 36000]", num_samples="[1, 1000]", top_k="[1, 1024]", top_p="(0, 1]",
                                temperature="[0.01, 100]", cfg="[1, 100]", gain_db="[-60, 60]", seed="[0, 9.2e18]"))
    if round(c["seconds"] * common.FRAME_RATE) < 1:
        raise UserError(f"seconds={c['seconds']} is shorter than one codec step (1/{common.FRAME_RATE} s): ask for more")
    if c["format"] not in ("mp3", "wav"):
        raise UserError(f"format={c['format']!r}: use mp3 or wav")
    if c["continue_from"]:
        try:
            return common.load_audio(c["continue_from"])
        except Exception as e:
            raise UserError(f"cannot read --continue_from={c['continue_from']!r} ({str(e).splitlines()[0][:120]})") from None
    return None


def main(argv):
    c = common.parse_settings(common.settings(globals()), argv)
    continuation = validate(c)
    common.check_writable(c["out"], "out")
    dev = common.pick_device(c["device"])
    import train
    ckpt = train.load_checkpoint(c["ckpt"], "cpu")
    model_cfg = M.ModelConfig.from_dict(ckpt["model_config"])
    steps = round(c["seconds"] * common.FRAME_RATE)
    if steps > model_cfg.max_len:
        raise UserError(f"seconds={c['seconds']} is longer than this model's maximum of {model_cfg.max_len / common.FRAME_RATE:.0f} s "
                        f"(max_len={model_cfg.max_len} steps): ask for less")
    if c["cfg"] != 1 and ckpt["config"].get("cond_dropout", 0) <= 0:
        raise UserError("this model was trained with cond_dropout=0, so it has no unconditional mode: use --cfg=1")
    model = M.MusicTransformer(model_cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{c['ckpt']}: the weights do not match the model settings stored with them "
                        f"({str(e).splitlines()[1].strip()[:160] if len(str(e).splitlines()) > 1 else e})") from None
    model.to(dev).eval()
    text_encoder = M.TextEncoder(ckpt["config"]["text_encoder"], dev)
    data_info = ckpt["data"]
    codec = codec_for(data_info, c["codec_weights"], dev)
    if data_info["codec"].startswith("untrained"):
        print(f"NOTE: this model was trained on tokens of the untrained codec ({data_info['codec']}): the audio will be noise, not music")

    scale, prompt_codes = data_info["typical_scale"], None
    if continuation is not None:
        wav = continuation
        segments = common.whole_segments(wav.shape[1])
        if segments == 0 or segments * common.SEGMENT_STEPS >= steps:
            raise UserError(f"--continue_from must hold at least 1 s of audio and be shorter than --seconds={c['seconds']}")
        with torch.no_grad():
            codes, scales = common.encode_clips(codec, wav[None, :, :common.clip_samples(segments)].to(dev))
        prompt_codes, scale = codes[0], float(scales.median())

    prompts = [p for p in c["prompt"] for _ in range(c["num_samples"])]
    t0 = time.time()
    codes = sample_codes(model, text_encoder, prompts, steps, dev, c["seed"], c["top_k"], c["top_p"],
                         c["temperature"], c["cfg"], prompt_codes)
    t_tokens = time.time() - t0
    audio = codes_to_audio(codec, codes, scale, c["gain_db"])
    with common.disk_errors(c["out"], "files finished before it are intact"):
        write_outputs(c, prompts, audio, codes, steps, scale, ckpt, data_info)
    print(f"{len(prompts)} × {c['seconds']} s: tokens in {t_tokens:.1f} s ({steps / t_tokens:.0f} steps/s), "
          f"total {time.time() - t0:.1f} s")
    return 0


def write_outputs(c, prompts, audio, codes, steps, scale, ckpt, data_info):
    os.makedirs(c["out"], exist_ok=True)
    for i, (p, wav) in enumerate(zip(prompts, audio)):
        name = slug(p) + (f"_{i % c['num_samples']}" if c["num_samples"] > 1 else "")
        path = common.write_audio(os.path.join(c["out"], f"{name}.{c['format']}"), wav, c["format"], c["bitrate"], c["overwrite"])
        meta = dict(prompt=p, seed=c["seed"], batch_index=i, batch_prompts=prompts, seconds=c["seconds"],
                    steps=steps, top_k=c["top_k"], top_p=c["top_p"], temperature=c["temperature"], cfg=c["cfg"],
                    gain_db=c["gain_db"], scale=scale, continue_from=c["continue_from"], format=c["format"],
                    ckpt=os.path.abspath(c["ckpt"]), ckpt_step=ckpt["step"], codec=data_info["codec"],
                    sample_rate=common.SAMPLE_RATE, codes=codes[i].tolist())
        common.write_json(path + ".json", meta)
        if c["spectrogram"]:
            common.write_spectrogram(path + ".png", wav)
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
