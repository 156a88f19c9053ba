"""
Share a trained model: a folder with model.safetensors and config.json (no pickle), which generate.py
takes as --ckpt and deploy.py as --init_from.

    python export.py --ckpt=runs/lofi/ckpt.pt --out=lofi-model
    python export.py --ckpt=runs/lofi/ckpt.pt --out=lofi-model --push_to_hub=you/lofi-model   # needs internet

config.json holds everything generate.py needs: the model settings, the text encoder, the codec and the
typical loudness of the training data, whether it was trained for guidance, and the step.
"""
import os
import sys

import settings  # first: Ctrl-C while the libraries below load then ends in one line, not a traceback

import checkpoint
import codec
import common
from settings import UserError

# -----------------------------------------------------------------------------
# settings: edit here, or override on the command line as --name=value
ckpt = ""              # checkpoint written by deploy.py (RUN/ckpt.pt)
out = ""               # folder to write (new or empty, or holding an earlier export of this project, which is replaced)
ema = True             # export the EMA weights (false: the raw weights of the last step)
push_to_hub = ""       # a Hugging Face repository (user/name) to upload the folder to: needs internet and a login
# -----------------------------------------------------------------------------


def export(ckpt_path, out_dir, ema=True):
    model, info = checkpoint.load_model(ckpt_path, ema=ema)
    data = {k: v for k, v in info["data"].items() if k not in ("shards", "validation")}   # what generate.py needs
    config = dict(format=checkpoint.EXPORT_FORMAT, model=info["model"], text_encoder=info["text_encoder"], data=data,
                  cond_dropout=info["cond_dropout"], step=info["step"], weights=info["weights"], seq_len=info.get("seq_len"),
                  sampling=info.get("sampling"), sample_rate=codec.SAMPLE_RATE, frame_rate=codec.FRAME_RATE)
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, "model.safetensors")
    with common.disk_errors(out_dir, "nothing else was changed"):
        with common.atomic_path(weights) as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp, metadata={"format": checkpoint.EXPORT_FORMAT})
        common.write_json(os.path.join(out_dir, "config.json"), config)
    return config


def earlier_export(out_dir):
    """Whether out_dir holds an earlier export of this project, which may be replaced: only config.json in
    export.py's format and model.safetensors. A folder holding anything else is refused (a downloaded
    model, someone's files); an empty or new one is fine."""
    import json
    held = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
    if not held:
        return False
    try:
        with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
            ours = json.load(f).get("format") == checkpoint.EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours or not held <= {"config.json", "model.safetensors"}:
        raise UserError(f"--out={out_dir} already holds files that export.py did not write ({', '.join(sorted(held)[:4])}"
                        f"{', ...' if len(held) > 4 else ''}): choose a new folder")
    return True


def upload(out_dir, repo):
    try:
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=out_dir, repo_id=repo)
    except Exception as e:
        raise UserError(f"could not upload {out_dir} to the Hugging Face Hub as {repo} ({type(e).__name__}: "
                        f"{settings.first_line(e, 160)}): it needs internet and a login "
                        "(huggingface-cli login); the exported folder itself is complete") from None


def main(argv):
    c = settings.parse_settings(globals(), argv)
    if not c["ckpt"]:
        raise UserError("--ckpt is missing: give a checkpoint written by deploy.py, e.g. --ckpt=runs/lofi/ckpt.pt")
    if not c["out"]:
        raise UserError("--out is missing: give a folder to write the model into, e.g. --out=lofi-model")
    common.check_writable(c["out"], "out")
    if earlier_export(c["out"]):
        print(f"replacing the earlier export in {c['out']}")
    config = export(c["ckpt"], c["out"], c["ema"])
    print(f"exported the {config['weights']} weights of {c['ckpt']} (step {config['step']}) to {c['out']}: "
          f"model.safetensors + config.json; generate with: python generate.py --ckpt={c['out']} --prompt=\"...\"")
    if c["push_to_hub"]:
        upload(c["out"], c["push_to_hub"])
        print(f"uploaded to https://huggingface.co/{c['push_to_hub']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
