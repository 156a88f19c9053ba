"""
How good is a model, measured with it: validation losses (with its own labels, exchanged ones and the empty
text: the conditioning gap), the baselines it must beat, and samples made with given sampling settings,
scored against the real clips (quality.py's math). What train.py's evaluations log and evaluate.py prints.
"""
import numpy as np
import torch

import codec
import decoding
import model as M
import quality

def batch_tensors(codes, texts, text_encoder, pattern, vocab, device):
    """codes (B, n_q, T) with UNKNOWN padding → model inputs, targets and the encoded text, on device."""
    targets = M.to_layout(codes, pattern)
    tokens = M.inputs_from_targets(targets, vocab)
    text, mask = text_encoder(texts, device)
    return tokens.to(device, non_blocking=True), targets.to(device, non_blocking=True), text, mask


# -----------------------------------------------------------------------------
# validation, the conditioning gap, and baselines to beat

def exchanged(labels):
    """Each label replaced by the next distinct one (in sorted order), so no clip keeps its own; None when
    there is only one."""
    distinct = sorted(set(labels))
    other = {text: distinct[(k + 1) % len(distinct)] for k, text in enumerate(distinct)}
    return [other[t] for t in labels] if len(distinct) > 1 else None


@torch.no_grad()
def evaluate(model, data, c, text_encoder, device, autocast):
    """Validation cross-entropy on the first eval_clips held-out clips, from their start: with their own
    labels, with the labels exchanged (each clip gets another label of the set, never its own) and with the
    empty text. conditioning_gap = exchanged − own: how much the model uses its text (about 0: it does not
    listen); left out when the clips share one label, where nothing can be exchanged."""
    ids = [int(i) for i in data.val_ids[:c.eval_clips]]
    if not ids:
        return None
    codes = torch.from_numpy(np.stack([data.read(i, 0, c.seq_len) for i in ids]))
    own = [data.texts[i] for i in ids]
    runs = [("val_loss", own), ("val_loss_shuffled", exchanged(own)), ("val_loss_empty", [""] * len(ids))]
    out = {}
    for name, labels in [r for r in runs if r[1] is not None]:
        total = torch.zeros(data.n_q)
        for i in range(0, len(ids), c.batch_size):
            tokens, targets, text, mask = batch_tensors(codes[i:i + c.batch_size], labels[i:i + c.batch_size], text_encoder,
                                                        c.pattern, model.cfg.vocab, device)
            with autocast:
                _, per_codebook = M.codebook_loss(model(tokens, text, mask), targets)
            total += per_codebook.float().cpu() * len(tokens)
        per_codebook = total / len(ids)
        out[name] = round(per_codebook.mean().item(), 5)
        if name == "val_loss":
            out["val_loss_per_codebook"] = [round(x, 5) for x in per_codebook.tolist()]
    if "val_loss_shuffled" in out:
        out["conditioning_gap"] = round(out["val_loss_shuffled"] - out["val_loss"], 5)
    return out


def spread(ids, n):
    """Up to n of ids, evenly spread over them."""
    return [int(i) for i in ids[::max(1, len(ids) // n)][:n]]


def baselines(data, c, vocab, max_clips=1000):
    """What lookup tables score on the validation clips the model is scored on (quality.baselines), fitted on
    up to max_clips training clips."""
    val = [data.read(i, 0, c.seq_len) for i in data.val_ids[:c.eval_clips]]
    fit = [data.read(i, 0, int(data.lengths[i])) for i in spread(data.train_ids, max_clips)]
    return quality.baselines(fit, val, vocab) if val and fit else {}


# -----------------------------------------------------------------------------
# samples: made with sampling settings, scored against the real clips

def make_reference(data, c, data_info, vocab, device, max_clips=1000):
    """The real side of the sample metrics (quality.Reference) for this run's data, and the fixed prompts
    the samples are made for (the labels of the first quality_samples validation clips, in turn); (None,
    None) where quality_samples=0 or there are no validation clips."""
    if not c.quality_samples or not len(data.val_ids):
        return None, None
    steps = max(1, round(c.quality_seconds)) * codec.SEGMENT_STEPS
    clips = lambda ids: [data.read(i, 0, steps) for i in ids]
    val, fit = [int(i) for i in data.val_ids[:c.quality_samples]], spread(data.train_ids, max_clips)
    encodec = codec.codec_for(data_info, c.codec_weights, device)
    reference = quality.Reference(encodec, clips(spread(data.train_ids, c.quality_samples)), clips(val),
                                  [data.texts[i] for i in val], quality.unigram_codes(clips(fit), c.quality_samples, steps, vocab),
                                  clips(fit), [data.texts[i] for i in fit])
    return reference, [data.texts[val[i % len(val)]] for i in range(c.quality_samples)]


@torch.no_grad()
def sample_codes(model, text_encoder, prompts, steps, device, seed, sampling, batch=16):
    """Codes (N, n_q, steps) of samples for `prompts`, batch by batch, with fixed seeds (seed + the batch's first
    index): the same noise at every evaluation, so the curves compare weights and settings, not luck."""
    return torch.cat([decoding.sample(model, text_encoder, prompts[i:i + batch], steps, device, seed=seed + i, **sampling).cpu()
                      for i in range(0, len(prompts), batch)])


@torch.no_grad()
def nll(model, text_encoder, clips, texts, device, batch=16):
    """The model's mean cross-entropy (nats) of clips [(n_q, T)] given their texts, teacher-forced: of its
    own samples, how sure it is of what it made (well below the real clips' figure: the sampler picks
    what it already found likely, as truncation does); of real clips, the validation loss over them."""
    total, count = 0.0, 0
    for i in range(0, len(clips), batch):
        codes = torch.as_tensor(np.stack([np.asarray(c) for c in clips[i:i + batch]])).long()
        tokens, targets, text, mask = batch_tensors(codes, list(texts[i:i + batch]), text_encoder, model.cfg.pattern,
                                                    model.cfg.vocab, device)
        _, per_codebook = M.codebook_loss(model(tokens, text, mask), targets)
        total, count = total + per_codebook.mean().item() * len(codes), count + len(codes)
    return round(total / max(1, count), 5)


def score_samples(model, text_encoder, reference, prompts, c, device, sampling):
    """Samples made for the fixed prompts with `sampling`, scored against the real clips: FAD, KAD, label
    adherence, the code statistics (repeats, distinct codes per second) and the model's NLL of them."""
    steps = max(1, round(c.quality_seconds)) * codec.SEGMENT_STEPS
    codes = sample_codes(model, text_encoder, prompts, steps, device, c.seed, sampling)
    return dict(reference.score(list(codes.numpy()), prompts), sample_nll=nll(model, text_encoder, codes, prompts, device))


def score_grid(model, text_encoder, reference, prompts, c, device, grid):
    """[(sampling, its scores)] for each sampling settings of `grid`, and the real clips' NLL (a row of its own)."""
    return [(s, score_samples(model, text_encoder, reference, prompts, c, device, s)) for s in grid]


def n(x):
    """A measure for a console line: 3 significant digits, or – where it could not be measured."""
    return "–" if x is None else f"{x:.3g}"


SAMPLE_COLUMNS = [("fad", "FAD"), ("kad", "KAD"), ("adherence", "adherence"), ("repeats", "repeats"),
                  ("distinct_per_s", "distinct codes/s"), ("sample_nll", "NLL of own samples")]


def sampling_table(scored, references, chosen=None):
    """The sampling study's table: a row per setting, beside the real clips' and the unigram noise's rows."""
    real = dict(fad=references.get("fad_real"), kad=references.get("kad_real"), adherence=references.get("adherence_real"),
                repeats=references.get("repeats_real"), distinct_per_s=references.get("distinct_per_s_real"),
                sample_nll=references.get("nll_real"))
    noise = dict(fad=references.get("fad_noise"), kad=references.get("kad_noise"), adherence=references.get("adherence_chance"),
                 repeats=references.get("repeats_noise"), distinct_per_s=references.get("distinct_per_s_noise"))
    rows = [("real clips (FAD/KAD: training clips; the rest: validation clips)", real),
            ("unigram noise (adherence: chance)", noise)]
    rows += [(decoding.describe(s) + ("   ← chosen" if s == chosen else ""), r) for s, r in scored]
    width = max(len(name) for name, _ in rows)
    lines = ["sampling".ljust(width) + "".join(f"  {title:>9}" for _, title in SAMPLE_COLUMNS)]
    lines += [name.ljust(width) + "".join(f"  {n(r.get(k)):>9}" for k, _ in SAMPLE_COLUMNS) for name, r in rows]
    return "\n".join(lines)


class Evaluation:
    """Rank 0's evaluation every eval_interval steps: the validation loss and the conditioning gap, then
    samples made with the run's sampling settings, scored against the references made once at the start.
    The last evaluation of a run scores every setting of sampling_grid and chooses the run's own (the
    lowest KAD among those whose label adherence is within reach of the best), which its checkpoint keeps
    and generate.py and app.py use."""

    def __init__(self, data, c, data_info, text_encoder, vocab, device, autocast, monitor, new_run, chosen):
        self.data, self.c, self.text_encoder, self.device, self.autocast, self.monitor = data, c, text_encoder, device, autocast, monitor
        self.chosen, self.grid = chosen, sampling_grid(c)
        self.reference, self.prompts = make_reference(data, c, data_info, vocab, device)
        if self.reference is not None and new_run:
            r = self.reference.references
            monitor.log(dict(step=0, **r))
            print(f"samples will be compared with {len(self.reference.val_clips)} validation clips in the codec's latent "
                  f"({c.quality_seconds:g} s each): real training clips score FAD {n(r['fad_real'])}, KAD {n(r['kad_real'])} "
                  f"(the floor), unigram noise FAD {n(r['fad_noise'])}, KAD {n(r['kad_noise'])}; label adherence of the "
                  + (f"real clips {n(r['adherence_real'])} (chance {n(r['adherence_chance'])})" if r["adherence_real"] is not None
                     else f"clips: not measurable ({self.reference.unmeasurable})"))

    def __call__(self, model, step, best_val, last=False):
        found = evaluate(model, self.data, self.c, self.text_encoder, self.device, self.autocast)
        if found is None:
            return best_val
        best_val = min(best_val, found["val_loss"])
        gap = (f"labels exchanged {found['val_loss_shuffled']:.4f}, empty text {found['val_loss_empty']:.4f}: conditioning "
               f"gap {found['conditioning_gap']:+.4f}" if "conditioning_gap" in found else
               f"empty text {found['val_loss_empty']:.4f}; conditioning gap: not measurable, the validation clips all have "
               "one label (raise val_fraction or eval_clips)")
        print(f"step {step}: validation loss {found['val_loss']:.4f} (best {best_val:.4f}); {gap}")
        if self.reference is not None:
            r = self.reference
            found["nll_real"] = nll(model, self.text_encoder, r.val_clips, r.val_labels, self.device)
            refs = dict(r.references, nll_real=found["nll_real"])
            if last and len(self.grid) > 1:
                scored = score_grid(model, self.text_encoder, r, self.prompts, self.c, self.device, self.grid)
                self.chosen = quality.choose_sampling(scored) or self.chosen
                print(f"step {step}: sampling settings scored ({len(self.prompts)} samples each; lower KAD: closer to the "
                      f"real clips):\n{sampling_table(scored, refs, self.sampling)}")
                found.update(next(x for s, x in scored if s == self.sampling))
                found["sampling_scores"] = [dict(sampling=s, **x) for s, x in scored]
                print(f"step {step}: this run's own sampling: {decoding.describe(self.sampling)} (kept in its checkpoint; "
                      "generate.py and app.py use it unless told otherwise)")
            else:
                found.update(score_samples(model, self.text_encoder, r, self.prompts, self.c, self.device, self.sampling))
            print(f"step {step}: samples ({decoding.describe(self.sampling)}) FAD {n(found['fad'])} (real {n(refs['fad_real'])}, "
                  f"noise {n(refs['fad_noise'])}), KAD {n(found['kad'])} (real {n(refs['kad_real'])}, noise {n(refs['kad_noise'])}), "
                  "label adherence " + (f"{n(found['adherence'])} (real {n(refs['adherence_real'])}, chance "
                                        f"{n(refs['adherence_chance'])})" if found["adherence"] is not None else "not measurable")
                  + f"; repeats {n(found['repeats'])} (real {n(refs['repeats_real'])}), distinct codes/s {n(found['distinct_per_s'])} "
                  f"(real {n(refs['distinct_per_s_real'])}), NLL of own samples {n(found['sample_nll'])} (real clips "
                  f"{n(refs['nll_real'])})")
            found["sampling"] = dict(self.sampling)
        self.monitor.log(dict(step=step, **found))
        return best_val

    @property
    def sampling(self):
        """The run's sampling settings: its own once chosen, else decoding's defaults."""
        return self.chosen or decoding.default_sampling(self.c.cond_dropout)


def sampling_grid(c):
    """The sampling settings a run's last evaluation chooses among (deploy.py's sampling_grid, on top of
    decoding's defaults), without guidance for a model trained without cond_dropout."""
    grid = decoding.parse_grid(c.sampling_grid, decoding.default_sampling(c.cond_dropout))
    return [s for s in grid if s["cfg"] == 1 or c.cond_dropout > 0]


