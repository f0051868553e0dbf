"""
flags.py — command-line flags into a config dataclass, the way train.py, generate.py and
bench.py read them:

    python train.py --config=tiny --clip_steps=200 --vit_cls false --compile

--config=NAME picks a preset (a dict of field values), then every --key=value, --key value
or bare --key (a boolean set to true) overrides one field, in any order; a hyphen in a key
reads as an underscore. Each value is parsed by the type of its dataclass field; an unknown
key, a value of the wrong type or a stray word is a ConfigError: one line, never a traceback.
--help (or -h) prints every flag, with its default and comment, and the presets.

Run the tests:  python -m pytest -q tests/test_flags.py
"""
import inspect
import os
import sys
import textwrap
from dataclasses import fields


class ConfigError(ValueError):
    """A user mistake on the command line: reported in one line, never a traceback."""


def parse_bool(text):
    """"--flag False" must mean False (argparse's type=bool makes it True: bool("False"))."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def split_flags(argv, types):
    """[(key, text of its value)] in command-line order; `types` maps each valid key to its type."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            pairs.append(("help", "true"))
            i += 1
            continue
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; flags look like --key=value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key != "config" and key not in types:
            raise ConfigError(f"unknown flag --{key} (--help lists them); valid: --config, "
                              + ", ".join(f"--{k}" for k in types))
        if not eq:  # --key value, or a bare boolean --key
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if types.get(key) is bool and (nxt is None or nxt.startswith("--")):
                value = "true"
            elif nxt is None or nxt.startswith("--"):
                raise ConfigError(f"--{key} needs a value")
            else:
                value, i = nxt, i + 1
        pairs.append((key, value))
        i += 1
    return pairs


def parse_flags(cls, argv, presets):
    """Build a `cls` dataclass from argv: --config=NAME picks a preset (default: the first),
    then every other flag overrides one field, whatever their order."""
    types = {f.name: f.type for f in fields(cls)}
    pairs = split_flags(argv, types)
    if ("help", "true") in pairs:
        print(usage(cls, presets))
        raise SystemExit(0)
    preset = dict(pairs).get("config", next(iter(presets)))
    if preset not in presets:
        raise ConfigError(f"unknown --config={preset}; presets: {', '.join(presets)}")
    values = dict(presets[preset])
    for key, value in pairs:
        if key == "config":
            continue
        typ = types[key]
        try:
            values[key] = parse_bool(value) if typ is bool else typ(value)
        except ValueError:
            raise ConfigError(f"--{key} expects {typ.__name__}, got {value!r}") from None
    return cls(**values)


def usage(cls, presets):
    """What --help prints: the presets (the first is the default), then the config dataclass's
    own source, where every flag stands with its type, default and comment."""
    lines = [f"usage: python {os.path.basename(sys.argv[0])} [--config=PRESET] [--key=value ...]", "presets:"]
    for name, values in presets.items():
        changes = ", ".join(f"{k}={v}" for k, v in values.items()) or "the defaults below"
        lines.append(f"  --config={name}: {changes}")
    lines.append(f"flags: every field of {cls.__name__}")
    return "\n".join(lines) + "\n" + textwrap.dedent(inspect.getsource(cls))


def tile_grids(cfg):
    """--tile_grids="1x2,2x1,2x2" -> ((1, 2), (2, 1), (2, 2)): (rows, cols) of each allowed grid."""
    grids = []
    for text in filter(None, cfg.tile_grids.split(",")):
        rows, x, cols = text.strip().partition("x")
        if not (x and rows.isdigit() and cols.isdigit() and 1 <= int(rows) <= 4 and 1 <= int(cols) <= 4):
            raise ConfigError(f"--tile_grids: {text!r} is not a grid RxC with 1 <= R, C <= 4 (e.g. 2x2)")
        grids.append((int(rows), int(cols)))
    return tuple(grids)
