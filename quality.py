"""
How good is a model, in numbers that need nothing downloaded: baselines its validation loss must beat, and
how its samples compare with the real clips in the codec's own latent space.

- Baselines: lookup tables fitted on training clips, their smoothing chosen on other training clips (never
  on the validation clips they are scored on): the unigram (add-α) and the bigram of the previous code of
  the same codebook, interpolated with the unigram by a weight among which 0 is, so that it cannot be worse
  than the unigram on the clips the weight was chosen on. (A bigram also conditioned on codebook 0's
  previous code was measured and dropped: on real music its weight came out 0, BENCHMARKS.md.)
- Samples: codes map back to Encodec's 128-value latent with the quantizer alone (no audio decoded), the
  space that fadtk's `encodec` embedding uses. A clip is a vector per codec segment (1 s): the mean of its
  latent over the segment and its spread (latent_segments). These vectors give FAD (Fréchet distance of Gaussians fitted to them) and KAD (an unbiased MMD
  with a Gaussian kernel, bandwidth the median distance between the real vectors; × 1000), each beside
  what real training clips score against the same validation clips (the floor at this sample count) and
  what codes drawn from the unigram score (no music). Label adherence: a nearest-centroid classifier of
  each clip's mean vector, fitted on training clips; the share of samples it gives their prompt's label,
  beside the share of real validation clips it gives their own, and chance.
"""
import math

import numpy as np
import torch

MIN_CLIPS_PER_LABEL = 3   # labels with fewer training clips get no centroid


# -----------------------------------------------------------------------------
# baselines

WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)   # of the bigram against the unigram
PSEUDO = (0.01, 0.1, 0.5, 1.0, 2.0, 5.0)                                       # the unigram's add-α


def _pairs(clips, k, vocab):
    """Codebook k's valid codes in clips and the code before each in the same codebook (the start token,
    vocab, before the first step)."""
    codes, prev = [], []
    for c in clips:
        before = np.concatenate([[vocab], c[k][:-1]])
        valid = c[k] >= 0
        codes.append(c[k][valid]), prev.append(np.where(before < 0, vocab, before)[valid])
    return np.concatenate(codes).astype(np.int64), np.concatenate(prev).astype(np.int64)


class NGrams:
    """One codebook's counts: of each code, and of each code after each previous code."""

    def __init__(self, clips, k, vocab):
        codes, prev = _pairs(clips, k, vocab)
        self.vocab = vocab
        self.uni = np.bincount(codes, minlength=vocab).astype(np.float64)
        self.bi = np.bincount(prev * vocab + codes, minlength=(vocab + 1) * vocab).reshape(vocab + 1, vocab).astype(np.float64)

    def probabilities(self, codes, prev, alpha, lam):
        """P(code) under the unigram with add-α, and under the bigram interpolated with it by λ."""
        uni = (self.uni + alpha) / (self.uni.sum() + alpha * self.vocab)
        seen = self.bi[prev].sum(1)
        return uni[codes], (1 - lam) * uni[codes] + lam * np.where(seen > 0, self.bi[prev, codes] / np.maximum(seen, 1), uni[codes])


def fit_baselines(train_clips, vocab, tune_share=0.1):
    """Per codebook: the smoothing (α, then λ) that scores best on a share of the training clips held out
    from the counts, then the counts of every training clip. Returns [(NGrams, (α, λ))]."""
    n_tune = max(1, round(len(train_clips) * tune_share)) if len(train_clips) > 1 else 0
    fit, tune = train_clips[n_tune:], train_clips[:n_tune]
    out = []
    for k in range(train_clips[0].shape[0]):
        alpha, lam = 1.0, 0.0
        if tune:
            grams, held = NGrams(fit, k, vocab), _pairs(tune, k, vocab)
            nll = lambda a, l, which: -np.log(grams.probabilities(*held, a, l)[which]).mean()
            alpha = min(PSEUDO, key=lambda a: nll(a, 0.0, 0))
            lam = min(WEIGHTS, key=lambda l: nll(alpha, l, 1))
        out.append((NGrams(train_clips, k, vocab), (alpha, lam)))
    return out, n_tune


def baselines(train_clips, val_clips, vocab):
    """The baselines' record for metrics.jsonl: the mean cross-entropy (nats) over codebooks, as
    codebook_loss averages a model's, of the uniform, the unigram and the bigram on the validation clips."""
    tables, n_tune = fit_baselines(train_clips, vocab)
    per = np.array([[-np.log(p).mean() for p in grams.probabilities(*_pairs(val_clips, k, vocab), *smoothing)]
                    for k, (grams, smoothing) in enumerate(tables)])
    uni, bi = per.mean(0)
    settings = "; ".join(f"codebook {k}: α={a:g}, λ={l:g}" for k, (_, (a, l)) in enumerate(tables))
    return dict(baseline_uniform=round(math.log(vocab), 5), baseline_unigram=round(float(uni), 5),
                baseline_bigram=round(float(bi), 5), baseline_clips=len(train_clips),
                baseline_fit=f"counts of {len(train_clips)} training clips; smoothing chosen on {n_tune} of them held out "
                             f"from the counts ({settings})")


def unigram_codes(train_clips, n, steps, vocab, seed=0):
    """n clips of codes drawn independently from each codebook's unigram: audio with no music in it."""
    g = np.random.default_rng(seed)
    out = []
    for k in range(train_clips[0].shape[0]):
        counts = np.bincount(np.concatenate([c[k][c[k] >= 0] for c in train_clips]), minlength=vocab) + 1.0
        out.append(g.choice(vocab, size=(n, steps), p=counts / counts.sum()))
    return np.stack(out, 1)


# -----------------------------------------------------------------------------
# the codec's latent: FAD, KAD, label adherence

@torch.no_grad()
def latent_segments(codec, clips, segment=150):
    """Clips of codes [(n_q, T)] → per clip, a vector per whole codec segment (1 s): the mean of the codec's
    latent over the segment's 150 frames and its spread (standard deviation) over them, (S, 256). The mean
    says what the second sounds like, the spread how much it moves: codes shuffled in time keep the means
    and lose the spread. A clip shorter than a segment: one vector of what it has."""
    out = []
    for c in clips:
        c = torch.as_tensor(np.asarray(c))
        c = c[:, :int((c >= 0).all(0).long().cumprod(0).sum())]       # up to the first padded step
        z = codec.quantizer.decode(c[:, None].long().to(next(codec.parameters()).device))[0].float().cpu()   # (128, T)
        whole = z.shape[-1] // segment
        parts = z[:, :whole * segment].reshape(z.shape[0], whole, segment) if whole else z[:, None]
        out.append(torch.cat([parts.mean(-1), parts.std(-1, correction=0)]).T.numpy())
    return out


def fad(a, b):
    """Fréchet distance between Gaussians fitted to the rows of a and b: |μa - μb|² + tr(Σa + Σb - 2 (Σa Σb)^½);
    None with fewer than two rows on a side (no covariance)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if min(len(a), len(b)) < 2:
        return None
    mu = a.mean(0) - b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(ca)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T                   # Σa^½
    cross = np.linalg.eigvalsh(root @ cb @ root)                      # the eigenvalues of Σa Σb
    return float(mu @ mu + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


def kad(a, b, bandwidth):
    """Unbiased MMD² between the rows of a and b with a Gaussian kernel, × 1000; None with fewer than two
    rows on a side."""
    if min(len(a), len(b)) < 2:
        return None
    a, b = torch.as_tensor(np.asarray(a), dtype=torch.float64), torch.as_tensor(np.asarray(b), dtype=torch.float64)
    kernel = lambda x, y: torch.exp(-torch.cdist(x, y).pow(2) / (2 * bandwidth ** 2))
    kaa, kbb, kab = kernel(a, a), kernel(b, b), kernel(a, b)
    n, m = len(a), len(b)
    mmd = (kaa.sum() - kaa.diag().sum()) / (n * (n - 1)) + (kbb.sum() - kbb.diag().sum()) / (m * (m - 1)) - 2 * kab.mean()
    return float(1000 * mmd)


def code_statistics(clips, segment=150):
    """What the codes themselves say, beside the latent's FAD/KAD: `repeats`, the share of codes equal to the
    previous step's code of the same codebook (a sampler that truncates the distribution repeats itself),
    and `distinct_per_s`, the distinct codes of codebook 0 in each second (segment), averaged. Clips
    [(n_q, T)]; padding (< 0) is left out."""
    same, pairs, distinct = 0, 0, []
    for c in clips:
        c = np.asarray(c)
        c = c[:, :int((c >= 0).all(0).cumprod().sum())]
        same += int((c[:, 1:] == c[:, :-1]).sum())
        pairs += c[:, 1:].size
        distinct += [len(np.unique(c[0, s:s + segment])) for s in range(0, c.shape[1] - segment + 1, segment)]
    return dict(repeats=round(same / max(1, pairs), 5), distinct_per_s=round(float(np.mean(distinct)), 2) if distinct else None)


ADHERENCE_REACH = 0.1   # sampling settings whose samples' adherence is this close to the best one's are "within reach"


def choose_sampling(scored):
    """scored: [(sampling settings, their samples' scores)] → the settings whose samples are closest to the
    real clips (lowest KAD) among those whose label adherence is within ADHERENCE_REACH of the best: sounding
    like the data first, following the label as well as any setting does. Where adherence is not measurable,
    the lowest KAD; None where nothing was measured."""
    scored = [(s, r) for s, r in scored if r.get("kad") is not None]
    if not scored:
        return None
    adherence = [r["adherence"] for _, r in scored if r.get("adherence") is not None]
    best = max(adherence) if adherence else None
    reach = [(s, r) for s, r in scored if best is None or (r.get("adherence") or 0) >= best - ADHERENCE_REACH - 1e-9]
    return min(reach, key=lambda sr: sr[1]["kad"])[0]


def median_distance(x):
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    d = torch.cdist(x, x)
    return float(d[torch.triu(torch.ones_like(d, dtype=torch.bool), 1)].median()) if len(x) > 1 else 1.0


def _rounded(x):
    return None if x is None else round(x, 4)


class Reference:
    """The real clips' side of the sample metrics, made once per run: the validation clips' vectors (what
    samples are compared with), the references (as many real training clips as samples, and as many clips
    of unigram noise), and the label centroids from (more) training clips' mean vectors."""

    def __init__(self, codec, real_clips, val_clips, val_labels, noise_clips, train_clips, train_labels):
        self.codec, self.val_clips, self.val_labels = codec, val_clips, val_labels
        self.val = np.concatenate(latent_segments(codec, val_clips))
        self.bandwidth = median_distance(self.val)
        real = np.concatenate(latent_segments(codec, real_clips))
        noise = np.concatenate(latent_segments(codec, noise_clips))
        self.references = dict(fad_real=_rounded(fad(real, self.val)), kad_real=_rounded(kad(real, self.val, self.bandwidth)),
                               fad_noise=_rounded(fad(noise, self.val)), kad_noise=_rounded(kad(noise, self.val, self.bandwidth)))
        means = np.stack([s.mean(0) for s in latent_segments(codec, train_clips)])
        self.scale = means.std(0) + 1e-8
        counts = {t: train_labels.count(t) for t in set(train_labels)}
        self.labels = sorted(t for t, n in counts.items() if n >= MIN_CLIPS_PER_LABEL)
        self.centroids = np.stack([means[[i for i, t in enumerate(train_labels) if t == label]].mean(0) / self.scale
                                   for label in self.labels]) if len(self.labels) > 1 else None
        shared = sorted(set(val_labels) & set(self.labels))
        self.unmeasurable = (f"fewer than two labels with {MIN_CLIPS_PER_LABEL} training clips each"
                             if self.centroids is None else None if shared else
                             f"{len(self.labels)} labels have {MIN_CLIPS_PER_LABEL} training clips or more, but no validation "
                             "clip compared carries one of them")
        self.references.update(adherence_real=self.adherence(val_clips, val_labels),
                               adherence_chance=round(1 / len(self.labels), 5) if self.centroids is not None else None)
        self.references.update({f"{k}_real": v for k, v in code_statistics(val_clips).items()})
        self.references.update({f"{k}_noise": v for k, v in code_statistics(noise_clips).items()})

    def classify(self, clips):
        means = np.stack([s.mean(0) for s in latent_segments(self.codec, clips)]) / self.scale
        return [self.labels[i] for i in ((means[:, None] - self.centroids[None]) ** 2).sum(-1).argmin(1)]

    def adherence(self, clips, labels):
        """The share of clips whose mean vector is nearest their own label's centroid (None: not measurable,
        fewer than two labels with MIN_CLIPS_PER_LABEL training clips, or no clip with such a label)."""
        if self.centroids is None:
            return None
        kept = [(c, t) for c, t in zip(clips, labels) if t in self.labels]
        if not kept:
            return None
        found = self.classify([c for c, _ in kept])
        return round(float(np.mean([f == t for f, (_, t) in zip(found, kept)])), 5)

    def score(self, sample_clips, prompts):
        """FAD, KAD, adherence and the code statistics of samples (codes, made for `prompts`) against the
        validation clips."""
        vectors = np.concatenate(latent_segments(self.codec, sample_clips))
        return dict(fad=_rounded(fad(vectors, self.val)), kad=_rounded(kad(vectors, self.val, self.bandwidth)),
                    adherence=self.adherence(sample_clips, prompts), **code_statistics(sample_clips))
