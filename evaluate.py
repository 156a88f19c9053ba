"""
Score a trained model on shards, as training scores it at each evaluation: its validation loss against the
baselines (lookup tables), the conditioning gap, and its samples' FAD, KAD, label adherence, repeats,
distinct codes and the model's NLL of them, each beside the real clips' figure; with several sampling
settings, one row per setting. Nothing is downloaded.

    python evaluate.py --ckpt=runs/lofi --data=data/                        # the run's own validation clips
    python evaluate.py --ckpt=runs/lofi --data=data/ --cfg=1,1.5,3 --top_k=0,250   # 6 sampling settings, one table
    python evaluate.py --ckpt=lofi-model --data=other/ --samples=64         # any model on any shards of its codec
    python evaluate.py --ckpt=runs/lofi --data=data/ --out=scores.json

With the run's own data (its checkpoint names its shards), the clips scored are its validation clips;
otherwise val_fraction of the clips of --data, drawn with --seed, and the rest play the training clips'
part (baselines, centroids, the real-clips reference).
"""
import os
import sys
from types import SimpleNamespace

import settings  # first: Ctrl-C while the libraries below load then ends in one line, not a traceback
import torch

import checkpoint
import common
import decoding
import deploy
import quality
import scoring
from settings import UserError

# -----------------------------------------------------------------------------
# settings: edit here, or override on the command line as --name=value
ckpt = ""                   # a run folder (deploy.py's --out), its ckpt.pt, or a folder written by export.py
data = ""                   # folder of .h5 shards (of the codec the model was trained on)
ema = True                  # score the EMA weights (false: the raw weights of the last step)
samples = 32                # samples made and scored (0: only the losses)
seconds = 10.0              # ... of this many seconds each (whole codec segments; one vector per second each)
eval_clips = 64             # validation clips the losses are measured on
seq_len = 0                 # codec steps of each clip scored, from its start (0: the run's seq_len, else the model's max_len)
batch_size = 8              # clips per forward pass
val_fraction = 0.02         # with shards that are not the run's own: the share held out as validation clips
top_k = "auto"              # sampling settings (generate.py's): a value, or several separated by commas (every
top_p = "auto"              # combination is scored, a row each); auto: the model's own choice (made by its
temperature = "auto"        # run's last evaluation), else generate.py's defaults
cfg = "auto"
seed = 1337                 # the seeds of the samples, and of that split
out = ""                    # also write the scores to this .json file
codec_weights = ""          # local Encodec weights (pretrained codec without internet)
device = "auto"             # auto (cuda when available), cpu, cuda
# -----------------------------------------------------------------------------


def held_out(c, info):
    """deploy.Data with the clips to score as its validation clips: the run's own where --data holds its shards
    as they were, else a fresh split (said)."""
    before = info["data"]
    data = deploy.Data(c["data"], c["val_fraction"], c["seed"])
    if before.get("codec") != data.attrs["codec"]:
        raise UserError(f"the model was trained on tokens of {before.get('codec')}, the shards in --data are "
                        f"{data.attrs['codec']}: score it on shards of its own codec")
    kept = before.get("shards") and all(data.shards.get(name) == size for name, size in before["shards"].items())
    if kept:
        data.train_ids, data.val_ids = data.same_validation(before)
        print(f"scoring the run's own {len(data.val_ids)} validation clips")
    else:
        print(f"--data is not the data the model was trained on (or its checkpoint does not record it): {len(data.val_ids)} "
              f"of its {len(data)} clips are held out (val_fraction={c['val_fraction']}, seed={c['seed']}) and scored")
    if not len(data.val_ids):
        raise UserError(f"no clips to score in {c['data']}: it holds {len(data)}; raise --val_fraction")
    return data


def sampling_grid(c, own):
    """The sampling settings to score: every combination of the values given for top_k, top_p, temperature
    and cfg ("auto": the model's own choice `own`)."""
    import itertools
    values = {}
    for name in decoding.SAMPLING_RANGES:
        try:
            values[name] = [own[name] if part.strip() == "auto" else decoding.sampling_value(name, part.strip())
                            for part in str(c[name]).split(",")]
        except ValueError as e:
            raise UserError(f"--{e}; give a value, several separated by commas, or auto") from None
    return [dict(zip(values, combo)) for combo in itertools.product(*values.values())]


def main(argv):
    c = settings.parse_settings(globals(), argv)
    if not c["ckpt"] or not c["data"]:
        raise UserError("give the model and the shards to score it on: --ckpt=RUN_FOLDER --data=SHARDS_FOLDER")
    settings.check_ranges(c, dict(samples="[0, 100000]", seconds="[1, 600]", eval_clips="[1, inf)", seq_len="[0, inf)",
                                batch_size="[1, 65536]", val_fraction="(0, 1)", seed="[0, 4294967295]"))
    dev = common.pick_device(c["device"])
    model, info = checkpoint.load_model(c["ckpt"], ema=c["ema"], device=dev)
    own = info.get("sampling") or decoding.default_sampling(info["cond_dropout"])
    grid = sampling_grid(c, own)
    if any(s["cfg"] != 1 for s in grid) and info["cond_dropout"] <= 0:
        raise UserError("this model was trained with cond_dropout=0, so it has no unconditional mode: use --cfg=1")
    data = held_out(c, info)
    run = SimpleNamespace(eval_clips=c["eval_clips"], seq_len=c["seq_len"] or info.get("seq_len") or model.cfg.max_len,
                          batch_size=c["batch_size"],
                          pattern=model.cfg.pattern, quality_samples=c["samples"], quality_seconds=c["seconds"],
                          codec_weights=c["codec_weights"], seed=c["seed"], cond_dropout=info["cond_dropout"])
    text_encoder = checkpoint.TextEncoder(info["text_encoder"], dev)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.startswith("cuda") else torch.autocast("cpu", enabled=False)
    scores = dict(scoring.baselines(data, run, model.cfg.vocab))
    scores.update(scoring.evaluate(model, data, run, text_encoder, dev, autocast) or {})
    reference, prompts = scoring.make_reference(data, run, info["data"], model.cfg.vocab, dev)
    scored = []
    if reference is not None:
        scores.update(reference.references, nll_real=scoring.nll(model, text_encoder, reference.val_clips, reference.val_labels, dev))
        scored = scoring.score_grid(model, text_encoder, reference, prompts, run, dev, grid)
    report(scores)
    if scored:
        best = quality.choose_sampling(scored) if len(scored) > 1 else None
        where = "its own choice" if info.get("sampling") else "the defaults (its run has not chosen its own)"
        print(f"samples: {len(prompts)} of {c['seconds']:g} s for the validation clips' labels; auto = {where}\n"
              + scoring.sampling_table(scored, scores, best))
        if best is not None:
            print(f"closest to the real clips among the settings that follow the label about as well as the best: "
                  f"{decoding.describe(best)}; to use it: python generate.py --ckpt={c['ckpt']} "
                  + " ".join(f"--{k}={v:g}" for k, v in best.items()))
        scores["samples"] = [dict(sampling=s, **x) for s, x in scored]
        if len(scored) == 1:
            scores.update(scored[0][1], sampling=scored[0][0])
    if c["out"]:
        common.write_json(c["out"], dict(ckpt=os.path.abspath(c["ckpt"]), data=os.path.abspath(c["data"]), step=info["step"],
                                         weights=info["weights"], **scores))
        print(f"wrote {c['out']}")
    return 0


def report(s):
    """The losses, each beside its references, one line each."""
    value = lambda k: "not measurable" if s.get(k) is None else f"{s[k]:.3f}"
    lines = [f"validation loss {value('val_loss')} nats; baselines: uniform {value('baseline_uniform')}, unigram "
             f"{value('baseline_unigram')}, bigram {value('baseline_bigram')}"]
    if "conditioning_gap" in s:
        lines.append(f"conditioning gap {value('conditioning_gap')} nats (labels exchanged {value('val_loss_shuffled')}); "
                     f"empty text {value('val_loss_empty')}")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
