"""
Prepare "pycode": the Python source of the standard library of the Python running this script.
It needs no download (every Python install carries it), so it is the default dataset for the
CPU quick start: ~12 MB of real, long, structured text in ~700 files, enough to see a small model
learn indentation, matching brackets and long-range references within a file.

    python data/pycode/prepare.py                    # byte tokenizer (the default here)
    python data/pycode/prepare.py --tokenizer gpt2

train.py calls prepare() below by itself the first time it is asked for this dataset.

What is in it:
- every .py file under sysconfig.get_paths()['stdlib'], one document per file;
- left out: site-packages / dist-packages (installed third-party packages, which differ from
  machine to machine), the test suites (any test/, tests/ or idle_test/ folder: 20 MB of mostly
  repetitive unittest code and deliberately odd files, which would dwarf the library itself),
  the machine-specific _sysconfigdata_*.py build settings, empty files, and any file that is
  not valid UTF-8.
Files are visited in sorted order of their path relative to the stdlib folder (with '/' as the
separator), and each file's split comes from a SHA-1 hash of that relative path: ~95% train,
~5% validation. A file's split therefore never depends on which other files exist, and a given
Python version always gives the same dataset. (Different Python versions give different data.)

Output: data/pycode/<tokenizer>/{train,validation}.bin, .docs.npy and meta.json.
"""

import argparse
import hashlib
import os
import platform
import sys
import sysconfig
import time

# make the repository root importable when run as `python data/pycode/prepare.py`
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
from data.common import default_num_proc, prepare_splits  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VALIDATION_PERCENT = 5
SKIP_DIRS = {'site-packages', 'dist-packages', 'test', 'tests', 'idle_test', '__pycache__'}


def split_of(relpath):
    """'train' or 'validation' for a stdlib-relative path like 'json/decoder.py'. A stable
    hash (unlike Python's hash(), which is salted per process) of the path alone."""
    bucket = int(hashlib.sha1(relpath.encode('utf-8')).hexdigest(), 16) % 100
    return 'validation' if bucket < VALIDATION_PERCENT else 'train'


def stdlib_files(stdlib=None):
    """Sorted stdlib-relative paths ('/'-separated) of the .py files that make the dataset."""
    stdlib = stdlib or sysconfig.get_paths()['stdlib']
    rels = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]  # don't descend into these
        for name in files:
            if not name.endswith('.py') or name.startswith('_sysconfigdata_'):
                continue
            path = os.path.join(root, name)
            with open(path, 'rb') as f:
                raw = f.read()
            if not raw.strip():
                continue  # empty (lots of __init__.py): no document
            try:
                raw.decode('utf-8')
            except UnicodeDecodeError:
                continue  # a few old files are Latin-1; not worth special-casing
            rels.append(os.path.relpath(path, stdlib).replace(os.sep, '/'))
    return sorted(rels)


def prepare(tokenizer='byte', out_dir=None, num_proc=None, quiet=False, overwrite=False):
    """Tokenize the stdlib into out_dir (default data/pycode/<tokenizer>). Returns out_dir."""
    out_dir = out_dir or os.path.join(HERE, tokenizer)
    stdlib = sysconfig.get_paths()['stdlib']
    split_paths = {'train': [], 'validation': []}
    for rel in stdlib_files(stdlib):
        split_paths[split_of(rel)].append(os.path.join(stdlib, *rel.split('/')))
    source = (f"Python {platform.python_version()} standard library .py files at {stdlib} "
              f"(tests and site-packages excluded; {VALIDATION_PERCENT}% validation by sha1 of path)")
    prepare_splits(out_dir, 'pycode', tokenizer, split_paths, source, num_proc, quiet, overwrite)
    return out_dir


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description="Tokenize Python's standard library source.")
    parser.add_argument('--tokenizer', default='byte', choices=['byte', 'gpt2'])
    parser.add_argument('--out_dir', default=None, help='default: data/pycode/<tokenizer>')
    parser.add_argument('--num_proc', type=int, default=default_num_proc(),
                        help='tokenizer processes (default: min(8, cpu count))')
    parser.add_argument('--quiet', action='store_true', help='no progress bars')
    parser.add_argument('--overwrite', action='store_true', help='replace token files in out_dir that were not '
                        'prepared from this dataset')
    args = parser.parse_args()
    t0 = time.time()
    try:
        prepare(args.tokenizer, args.out_dir, args.num_proc, args.quiet, args.overwrite)
    except ValueError as e:  # someone's token files in out_dir: one line, as argparse reports bad options
        parser.error(str(e))
    if not args.quiet:
        print(f"took {time.time() - t0:.1f}s")
