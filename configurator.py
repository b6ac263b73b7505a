"""
Settings from a config file and --key=value, on top of a script's defaults.

    python train.py configs/tiny_tapa.py --batch_size=32 --pos_encoding=rope

Every script keeps its settings as plain module-level defaults (nanoGPT style) and calls

    overrides = get_overrides(defaults, sys.argv[1:], optional_types)

which returns only the settings the user actually gave, already type-checked. `-h` or `--help`
prints the script's usage (pass doc=__doc__) and every setting with its default, then exits.
Arguments are applied left to right, so a later one wins:
  - `path/to/config.py`: a python file; each top-level assignment in it is a setting.
    (Modules it imports and names starting with '_' are ignored, so a config may compute values.)
  - `--key=value`: one setting. The value is read as a python literal when it is one
    (`--n_layer=8`, `--learning_rate=3e-4`, `--bias=True`, `--rope_scaling=None`), else as a string
    (`--pos_encoding=rope`), so strings need no quotes.

Why not nanoGPT's exec-into-globals? It accepts a typo (`--n_layers=8` silently does nothing) and
any type (`--batch_size=8.5` fails much later, far from the cause). Here both fail at once, with a
message that says what to write instead.

A setting's type is that of its default: bool, int, float or str (an int is fine where a float is
expected). A setting whose default is None needs an entry in `optional_types` saying what else it
may hold, e.g. {'rope_scaling': str, 'rope_original_block_size': int}; a tuple allows several types.
"""

import ast
import difflib
import os


class ConfigError(ValueError):
    """A setting that cannot be used; the message says what to change."""


def closest_keys(key, valid):
    """Up to three valid names closest to a mistyped one, for the error message."""
    return difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)


def unknown_key_error(key, valid, where):
    close = closest_keys(key, valid)
    hint = f"did you mean {' or '.join(repr(k) for k in close)}?" if close else \
        f"valid settings: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown setting {key!r} {where}; {hint}")


def allowed_types(key, defaults, optional_types):
    """The types `key` accepts, as a tuple (NoneType included when None is allowed)."""
    optional_types = optional_types or {}
    default = defaults[key]
    if key in optional_types:
        extra = optional_types[key]
        extra = extra if isinstance(extra, tuple) else (extra,)
        return extra + (type(None),) if default is None else (type(default),) + extra
    if default is None:
        raise ConfigError(f"setting {key!r} defaults to None but has no entry in optional_types")
    return (type(default),)


def check_value(key, value, types, where):
    """Return value converted to the setting's type (int -> float only), or raise ConfigError."""
    for t in types:
        # type(x) is t, not isinstance: True is an int in python, but --batch_size=True is a mistake
        if type(value) is t:
            return value
        if t is float and type(value) is int:
            return float(value)
    names = ' or '.join('None' if t is type(None) else t.__name__ for t in types)
    hint = ''
    if int in types and type(value) is float and value.is_integer():
        hint = f" (write {int(value)})"
    raise ConfigError(f"setting {key!r} {where} must be {names}, got {type(value).__name__} {value!r}{hint}")


def parse_value(key, text, types, where):
    """A command-line value: a python literal if it is one, else the raw string."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if bool in types and isinstance(value, str) and value.lower() in ('true', 'false'):
        value = value.lower() == 'true'  # be forgiving about --bias=true
    if str in types and type(value) not in types:
        value = text  # e.g. --dataset=123 or --out_dir=1e3 are names, not numbers
    return check_value(key, value, types, where)


def read_config_file(path):
    """The top-level assignments of a python config file, as a dict."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found (arguments that do not start with '--' "
                          f"are config files; settings are written --key=value)")
    with open(path) as f:
        source = f.read()
    namespace = {'__file__': os.path.abspath(path)}
    try:
        exec(compile(source, path, 'exec'), namespace)
    except Exception as e:
        raise ConfigError(f"config file {path} failed to run: {type(e).__name__}: {e}") from e
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and type(v).__name__ != 'module'}


HELP_FLAGS = ('-h', '--help')


def print_help(doc, defaults):
    """The script's usage (its module docstring), then every setting with its default."""
    if doc:
        print(doc.strip('\n'))
        print()
    print('settings and their defaults:\n' + '\n'.join(f'  --{k}={v!r}' for k, v in defaults.items()))


def get_overrides(defaults, argv, optional_types=None, doc=None):
    """Parse argv (config files and --key=value) against `defaults` (name -> default value).
    Returns {name: value} for the settings given, type-checked; raises ConfigError otherwise.
    -h or --help anywhere in argv prints the usage (doc: the script's docstring) and the settings
    with their defaults, and exits with status 0 (as argparse does), whatever else argv holds."""
    if any(arg in HELP_FLAGS for arg in argv):
        print_help(doc, defaults)
        raise SystemExit(0)
    overrides = {}
    for arg in argv:
        if arg.startswith('--'):
            if '=' not in arg:
                raise ConfigError(f"{arg!r}: write settings as --key=value (e.g. --batch_size=32)")
            key, text = arg[2:].split('=', 1)
            where = f"in {arg!r}"
            if key not in defaults:
                raise unknown_key_error(key, defaults, where)
            overrides[key] = parse_value(key, text, allowed_types(key, defaults, optional_types), where)
        else:
            where = f"in config file {arg}"
            for key, value in read_config_file(arg).items():
                if key not in defaults:
                    raise unknown_key_error(key, defaults, where)
                overrides[key] = check_value(key, value, allowed_types(key, defaults, optional_types), where)
    return overrides


class Settings(dict):
    """A run's settings: a dict (saved in checkpoints as one) whose entries read as attributes too."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None
