"""
Settings, the way every script takes them, and how a script ends: the first import of every script.

- Ctrl-C while a script starts (its libraries load for seconds) ends in one line and exit status 130, not a
  traceback: this module sets that up, so each script imports it before anything large.
- UserError: a mistake the user can fix, said in one line that starts with "error:", exit status 1.
- Settings are plain module-level variables in a block at the top of a script, overridable as
  --name=value; --help prints that block; names other trainers use, misspellings and settings of another
  script get a hint; numbers are checked against their intervals.

Not here: files and devices (common.py), audio (audio.py), the codec (codec.py).
"""
import difflib
import glob
import itertools
import math
import os
import signal
import sys

def _stop_quietly(kind, value, tb, default=sys.excepthook):
    """Ctrl-C that no part of a script caught (while its libraries load, or before it has made anything):
    one line and exit status 130, as every other interruption ends, instead of a traceback. Each script
    imports this module before the large libraries, so that this holds from its first second."""
    if not issubclass(kind, KeyboardInterrupt):
        return default(kind, value, tb)
    print("\nstopped (Ctrl-C) before there was anything to keep", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


sys.excepthook = _stop_quietly


class UserError(SystemExit):
    """A mistake in the input that the user can fix: one line on stderr, exit status 1, no traceback."""
    def __init__(self, message):
        super().__init__(f"error: {message}")


def first_line(error, limit=120):
    """The first line of an exception's message, at most `limit` characters (its type's name where it says nothing)."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def stop_on_sigterm():
    """SIGTERM (`kill`, a VM being preempted) then stops the run as Ctrl-C does: as a KeyboardInterrupt, which
    the script catches to keep what it made before it exits."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def stopped(kept):
    """The exit of a run stopped by Ctrl-C or SIGTERM once it has kept what it made: one line on stderr that
    says what is kept, exit status 130 (as the shell gives Ctrl-C), no traceback. Raise what it returns."""
    print(f"\nstopped: {kept}", file=sys.stderr)
    return SystemExit(130)


# -----------------------------------------------------------------------------
# settings: plain module-level variables, overridable as --name=value or --name value

def settings(namespace):
    """The editable settings of a script: its lower-case module-level bools, ints, floats, strings and lists."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and k.islower() and isinstance(v, (bool, int, float, str, list))}


def parse_value(name, text, default):
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
                value = kind(text)
                if kind is float and not math.isfinite(value):
                    raise UserError(f"--{name} takes a finite number, not {text!r}")
                return value
            except ValueError:
                try:  # allow 1e4 for an int setting when it is a whole number
                    value = float(text)
                    if kind is int and value.is_integer():
                        return int(value)
                except ValueError:
                    pass
                raise UserError(f"--{name} takes {'a whole number' if kind is int else 'a number'}, not {text!r}")
    return text


# names that other training and generation scripts use for settings this project names otherwise
OTHER_NAMES = dict(learning_rate="lr", epochs="max_steps", epoch="max_steps", steps="max_steps", max_iters="max_steps",
                   num_steps="max_steps", iterations="max_steps", bs="batch_size", batch="batch_size",
                   train_batch_size="batch_size", output_dir=("out", "output"), outdir=("out", "output"),
                   output=("out", "output"), input_dir="input", data_dir="data", dataset="data", resume_from="resume",
                   checkpoint="ckpt", model="ckpt", prompt_text="prompt", text="prompt", description="prompt",
                   duration="seconds", length="seconds", secs="seconds", cfg_scale="cfg", guidance_scale="cfg",
                   guidance="cfg", cfg_coef="cfg", topk="top_k", topp="top_p", temp="temperature", samples="num_samples",
                   n_samples="num_samples", num_workers_per_gpu="num_workers", warmup="warmup_steps", wd="weight_decay",
                   clip_grad="grad_clip", max_grad_norm="grad_clip", gradient_accumulation_steps="grad_accum")


# settings of one script that users give to another, with why they are not there
ELSEWHERE = dict(codec="the codec comes from the shards (compress.py's --codec): a model trains on the tokens its data "
                       "was encoded with, and generate.py decodes with the codec its checkpoint names",
                 codec_seed="the codec comes from the shards (compress.py's --codec_seed)",
                 bandwidth="the codebooks come from the shards (compress.py's --bandwidth)",
                 clip_seconds="clips are cut by compress.py (its --clip_seconds); training crops them to --seq_len")


def suggestion(name, defaults):
    """The setting an unknown name probably means: the name other trainers give it, a near spelling, or the one
    setting it begins."""
    other = OTHER_NAMES.get(name.lower())
    for candidate in (other,) if isinstance(other, str) else other or ():
        if candidate in defaults:
            return candidate
    close = difflib.get_close_matches(name, defaults, n=1)
    starting = [d for d in defaults if d.startswith(name)] if len(name) >= 2 else []
    return close[0] if close else starting[0] if len(starting) == 1 else None


def settings_elsewhere(name, script_path):
    """The other scripts beside `script_path` whose settings block has `name`."""
    import ast
    found = []
    for path in sorted(glob.glob(os.path.join(glob.escape(os.path.dirname(os.path.abspath(script_path))), "*.py"))):
        if os.path.basename(path) == os.path.basename(script_path):
            continue
        try:
            lines = open(path, encoding="utf-8").read().splitlines()
            start = next(i for i, line in enumerate(lines) if line.startswith("# settings"))
            block = "\n".join(itertools.takewhile(lambda line: not line.startswith("# ---"), lines[start + 1:]))
            names = {t.id for node in ast.parse(block).body if isinstance(node, ast.Assign) for t in node.targets
                     if isinstance(t, ast.Name)}
        except (StopIteration, SyntaxError, OSError):
            continue
        if name in names:
            found.append(os.path.basename(path))
    return found


def parse_settings(namespace, argv, given=None):
    """The settings of a script (its module namespace: `settings` picks them) with `--name=value` /
    `--name value` overrides applied. List settings (e.g. prompt) collect every occurrence; a bare `--flag`
    sets a boolean to true. `--help` or `-h` prints the settings block and exits. If `given` is a set, the
    names set on the command line are added to it."""
    defaults = settings(namespace)
    if "--help" in argv or "-h" in argv:
        try:
            print(script_help(namespace), flush=True)
        except BrokenPipeError:            # `--help | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)
    config = {k: list(v) if isinstance(v, list) else v for k, v in defaults.items()}
    seen_lists = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise UserError(f"unexpected argument {arg!r}: settings are given as --name=value (--help lists them)")
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name not in defaults:
            other = OTHER_NAMES.get(name.lower())
            known = any(o in defaults for o in ((other,) if isinstance(other, str) else other or ()))
            script = os.path.basename(namespace.get("__file__", "this script"))
            elsewhere = [] if known else settings_elsewhere(name, namespace.get("__file__", ""))
            close = suggestion(name, defaults)
            if name in ELSEWHERE or elsewhere:
                raise UserError(f"--{name} is not a setting of {script}: "
                                + (ELSEWHERE.get(name) or f"it is {' and '.join(elsewhere)}'s")
                                + f"; --help lists {script}'s settings")
            hint = f" (did you mean --{close}?)" if close else ""
            raise UserError(f"unknown setting --{name}{hint}; --help lists every setting with its default")
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
            config[name] = parse_value(name, value, default)
        i += 1
    return config


def script_help(namespace):
    """--help: the script's usage lines (the indented lines of its docstring) and its settings block, read
    from the file itself (each setting with its default and comment, the block's group lines between),
    so that it cannot drift from what the script does."""
    import ast
    path = namespace["__file__"]
    source = open(path, encoding="utf-8").read()
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# settings"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("# ---"))
    values = {node.lineno - 1: node for node in ast.parse(source).body if isinstance(node, ast.Assign)
              and start < node.lineno - 1 < end and isinstance(node.targets[0], ast.Name)}
    script = os.path.basename(path)
    doc = (namespace.get("__doc__") or "").strip("\n").splitlines()
    first = " ".join(line.strip() for line in itertools.takewhile(lambda line: line.strip(), doc))   # its first paragraph
    import textwrap
    out = [textwrap.fill(f"{script}: {first}", 110) if first else script, ""]
    usage = [line.rstrip() for line in doc if line.startswith("    ")]
    if usage:
        out += ["usage:", *usage, ""]
    out.append(f"settings (--name=value, or edit them at the top of {script}; defaults shown):")
    for i in range(start + 1, end):
        line = lines[i]
        if i in values:
            node = values[i]
            default = ast.get_source_segment(source, node.value)
            comment = line[node.end_col_offset:].strip().lstrip("#").strip()
            out.append((f"  --{node.targets[0].id}={default}".ljust(33) + f"  {comment}").rstrip())
        elif line.strip().startswith("#"):
            out.append(f"  {line.strip()}")
    return "\n".join(out)


def check_ranges(config, ranges):
    """ranges: {name: "[low, high)"}, in interval notation ("inf" allowed): a setting outside its interval
    stops with one line that names it and the interval."""
    for name, interval in ranges.items():
        low, high = (float(x) for x in interval[1:-1].split(","))
        value = config[name]
        above = value > low or (interval[0] == "[" and value == low)
        below = value < high or (interval[-1] == "]" and value == high)
        if not (above and below):
            raise UserError(f"{name}={value} is out of range: it must be in {interval}")


