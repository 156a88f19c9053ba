"""The quality signal: baselines a model must really beat, and sample metrics in the codec's latent that
separate music from noise and labels from each other. CPU, offline, seconds each."""
import json

import numpy as np
import pytest

import codec
import quality
from conftest import TINY_TRAIN, write_shards

VOCAB = 1024


def skewed_clips(n, steps, seed, structured):
    """Clips of 4 codebooks: codes from a skewed unigram, independent from step to step, or (structured) each
    step the previous code plus a small move, so the previous code tells a lot."""
    g = np.random.default_rng(seed)
    p = 1 / np.arange(1, VOCAB + 1) ** 0.8
    clips = []
    for _ in range(n):
        if structured:
            walk = g.choice(VOCAB, size=(4, 1), p=p / p.sum()) + np.cumsum(g.integers(-2, 3, size=(4, steps)), 1)
            clips.append(walk % VOCAB)
        else:
            clips.append(g.choice(VOCAB, size=(4, steps), p=p / p.sum()))
    return clips


def test_the_bigram_is_never_worse_than_the_unigram_where_pairs_are_sparse():
    train, val = skewed_clips(20, 300, 0, False), skewed_clips(5, 300, 1, False)     # 6,000 codes for 1M pairs
    found = quality.baselines(train, val, VOCAB)
    assert found["baseline_bigram"] <= found["baseline_unigram"] + 1e-3
    assert found["baseline_unigram"] < found["baseline_uniform"]
    assert "smoothing chosen on 2 of them held out" in found["baseline_fit"]
    structured = quality.baselines(skewed_clips(20, 300, 2, True), skewed_clips(5, 300, 3, True), VOCAB)
    assert structured["baseline_bigram"] < structured["baseline_unigram"] - 1.0        # where the previous code tells


@pytest.fixture(scope="module")
def encodec():
    return codec.load_codec("untrained", "", 0, 6.0, "cpu")


def ranges(n, low, high, seed, steps=450, hold=15):
    """Clips of codes from [low, high), each held for `hold` steps: a stand-in for a kind of music (a sound
    lasts, and its codes with it)."""
    g = np.random.default_rng(seed)
    return list(np.repeat(g.integers(low, high, size=(n, 4, -(-steps // hold))), hold, -1)[..., :steps])


def test_fad_and_kad_tell_music_from_noise(encodec):
    a, b = ranges(48, 100, 300, 0, 1500), ranges(48, 100, 300, 1, 1500)      # two draws of the same "music", 480 s each
    noise = list(quality.unigram_codes(a, 48, 1500, VOCAB, seed=2))          # its codes, each codebook shuffled in time
    va, vb, vn = (np.concatenate(quality.latent_segments(encodec, x)) for x in (a, b, noise))
    bandwidth = quality.median_distance(vb)
    assert quality.fad(va, va) == pytest.approx(0, abs=1e-6) and abs(quality.kad(va, va, bandwidth)) < 2000 / len(va)
    assert quality.fad(vn, vb) > 2 * quality.fad(va, vb)
    assert quality.kad(vn, vb, bandwidth) > 20 * max(quality.kad(va, vb, bandwidth), 1.0)


def test_adherence_of_separable_labels_is_near_one_and_of_unrelated_ones_near_chance(encodec):
    tones, drums = ranges(20, 0, 200, 3), ranges(20, 700, 900, 4)
    clips, labels = tones + drums, ["tones"] * 20 + ["drums"] * 20
    reference = quality.Reference(encodec, clips[::4], clips[1::4], labels[1::4], clips[2::4], clips[::2], labels[::2])
    assert reference.references["adherence_real"] == 1.0 and reference.references["adherence_chance"] == 0.5
    assert reference.score(clips[3::4], labels[3::4])["adherence"] == 1.0
    same = ranges(60, 100, 300, 5)                             # one kind of music under three unrelated labels
    words = ["calm", "happy", "dark"] * 20
    unrelated = quality.Reference(encodec, same[:10], same[30:], words[30:], same[:10], same[:30], words[:30])
    assert abs(unrelated.references["adherence_real"] - 1 / 3) < 0.25
    lonely = quality.Reference(encodec, same[:4], same[4:8], ["a", "b", "c", "d"], same[:4], same[8:12], ["e", "f", "g", "h"])
    assert lonely.references["adherence_real"] is None and lonely.score(same[:4], ["a"] * 4)["adherence"] is None


def test_training_and_evaluate_py_report_the_same_sample_metrics(tmp_path, capsys):
    import checkpoint
    import deploy
    import evaluate
    import export
    import generate
    data = write_shards(tmp_path / "data", clips=16, steps=450)
    out = tmp_path / "run"
    deploy.main(["--data", str(data), "--out", str(out), *TINY_TRAIN, "--max_steps=2", "--eval_interval=1",
                 "--val_fraction=0.25", "--quality_samples=4", "--quality_seconds=1", "--cond_dropout=0.3"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = {k for r in records if r["step"] == 0 for k in r}
    assert {"baseline_bigram", "baseline_fit", "fad_real", "kad_noise", "adherence_real", "adherence_chance"} <= first
    scored = [r for r in records if "kad" in r]
    assert [r["step"] for r in scored] == [1, 2] and all({"fad", "adherence", "val_loss"} <= set(r) for r in scored)
    sample_stats = {"repeats", "distinct_per_s", "sample_nll", "nll_real", "sampling"}
    assert all(sample_stats <= set(r) for r in scored) and {"repeats_real", "distinct_per_s_real", "repeats_noise"} <= first
    said = capsys.readouterr().out
    assert "step 2: samples (top_k=" in said and "KAD" in said and "label adherence" in said and "NLL of own samples" in said
    page = (out / "index.html").read_text()
    assert "samples&#x27; KAD" in page and "How to read these numbers" in page and "real clips" in page
    # the last evaluation scored the sampling grid and kept the run's own choice: in the checkpoint, the export, generate.py
    chosen = checkpoint.load_checkpoint(str(out / "ckpt.pt"))["sampling"]
    grid = [r for r in records if "sampling_scores" in r][-1]["sampling_scores"]
    assert [g["sampling"]["cfg"] for g in grid] == [1, 1.5, 2, 3] and chosen in [g["sampling"] for g in grid]
    assert "this run's own sampling: " in said and "← chosen" in said
    export.main(["--ckpt", str(out), "--out", str(tmp_path / "model")])
    assert json.loads((tmp_path / "model" / "config.json").read_text())["sampling"] == chosen
    capsys.readouterr()
    generate.main(["--ckpt", str(tmp_path / "model"), "--prompt=calm minor pad", "--seconds=1", "--out", str(tmp_path / "g")])
    assert "from the model's own choice" in capsys.readouterr().out
    meta = json.loads((tmp_path / "g" / "calm_minor_pad.mp3.json").read_text())
    assert {k: meta[k] for k in chosen} == chosen
    evaluate.main(["--ckpt", str(out), "--data", str(data), "--samples=4", "--seconds=1", "--out", str(tmp_path / "s.json")])
    again = json.loads((tmp_path / "s.json").read_text())
    logged = {k: v for r in records for k, v in r.items()}                    # the last value of each number
    assert again["sampling"] == chosen                                        # auto: the run's own choice
    for key in ("val_loss", "fad", "kad", "adherence", "baseline_bigram", "baseline_unigram", "kad_real", "adherence_real",
                "repeats", "distinct_per_s", "sample_nll", "nll_real"):
        assert again[key] == pytest.approx(logged[key], abs=1e-4), key         # the same weights, seeds and clips
