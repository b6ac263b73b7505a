"""
README.md's commands run as written: those of "Quick start", "Your first afternoon" and "Long
context", in the README's order, each with a few steps.

How: the commands are read from the fenced code blocks of those sections (one command a line,
`# comments` dropped), and each runs in a copy of the repository in a temporary folder, as a
subprocess, with settings appended after the README's own so that they win (configurator.py reads
`--key=value` left to right): 3 training steps instead of 500, a few hundred scored tokens instead
of 8,192, and so on (QUICK below). Nothing else about a command changes, so a renamed script, a
mistyped setting, a config that fails its checks, a wrong out_dir between two steps or a flag a
script no longer takes all fail here.

The data: pycode is prepared by the quick start itself, on first use, as on a fresh clone. PG-19
is made-up books (no real text in the tests): the download command fetches them from a fake bucket
on 127.0.0.1 (the same one as tests/test_data.py; only --base_url is added), and the offline command
reads them from ../shared/data/pg19_mini of the copy, which is where the README points.
`pip install` lines are not run; the test checks instead that what they install is installed.
"""

import importlib.metadata
import os
import random
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from test_data import FakeBucket  # the fake storage.googleapis.com of the download tests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ('Quick start', 'Your first afternoon', 'Long context')

# appended to every command of a script (after the README's settings, so these win)
QUICK = {
    'train.py': ['--max_iters=3', '--lr_decay_iters=3', '--warmup_iters=1', '--eval_interval=3',
                 '--eval_iters=1', '--log_interval=1', '--batch_size=2', '--device=cpu'],
    'finetune_long.py': ['--max_iters=2', '--lr_decay_iters=2', '--warmup_iters=1', '--eval_interval=2',
                         '--eval_iters=1', '--log_interval=1', '--batch_size=1', '--device=cpu'],
    'sample.py': ['--num_samples=1', '--max_new_tokens=8', '--device=cpu'],
    'eval_ppl.py': ['--max_tokens_per_length=300', '--max_docs=1', '--device=cpu'],
    'viz_bias.py': ['--mc_samples=200', '--tapa_mc_samples=2000', '--n_seqs=1', '--dpi=30'],
    'data/pg19/prepare.py': ['--num_proc=1', '--quiet'],
}


def readme_commands(text):
    """[(section, argv)] for every command in the fenced blocks of SECTIONS, in order."""
    commands, section, in_block = [], None, False
    for line in text.splitlines():
        if line.startswith('```'):
            in_block = not in_block
        elif in_block:
            if section in SECTIONS and line.strip():
                argv = shlex.split(line, comments=True)
                if argv:
                    commands.append((section, argv))
        elif line.startswith('## '):
            section = line[3:].strip()
    return commands


def test_readme_has_the_commands_this_test_runs():
    """The sections and the commands a student runs first are where this test looks for them (if
    the README is reorganised, this fails rather than the test below quietly running less)."""
    commands = readme_commands(open(os.path.join(ROOT, 'README.md')).read())
    found = {s for s, _ in commands}
    assert found == set(SECTIONS), found
    scripts = [argv[1] for _, argv in commands if argv[0] == 'python']
    for script in ('train.py', 'sample.py', 'data/pg19/prepare.py', 'eval_ppl.py', 'viz_bias.py', 'finetune_long.py'):
        assert script in scripts, script
    assert all(argv[0] in ('python', 'pip') for _, argv in commands), "a command this test cannot run"
    assert ['python', 'train.py', 'configs/quickstart.py'] in [argv for _, argv in commands]


def fake_book(rng, n_bytes):
    words = ['the', 'ship', 'sailed', 'at', 'dawn', 'and', 'her', 'captain', 'wrote', 'of', 'it', 'in', 'a',
             'letter', 'to', 'his', 'sister', 'who', 'lived', 'by', 'sea', 'long', 'ago', 'house']
    out = []
    while sum(len(w) + 1 for w in out) < n_bytes:
        out.append(rng.choice(words) + ('.\n' if rng.random() < 0.08 else ''))
    return ' '.join(out).encode()


def make_books(rng):
    """{split: {id: bytes}}: a few made-up books, long enough for 1024-token windows."""
    return {'train': {i: fake_book(rng, 20_000) for i in (11, 12, 13, 14)},
            'validation': {i: fake_book(rng, 6_000) for i in (21, 22)}}


def copy_repository(dest):
    """The repository's code, configs and docs, without prepared data, run outputs or caches."""
    def ignore(folder, names):
        skip = {n for n in names if n in ('.git', '__pycache__', '.pytest_cache', 'runs', 'figures', '.whl', '.gl')
                or n.startswith('out') or n.endswith(('.bin', '.npy'))}
        rel = os.path.relpath(folder, ROOT).split(os.sep)
        if len(rel) == 2 and rel[0] == 'data':  # data/<name>/<prepared or downloaded>/
            skip |= {n for n in names if os.path.isdir(os.path.join(folder, n))}
        return skip
    shutil.copytree(ROOT, dest, ignore=ignore)


def check_installed(argv, repo):
    """`pip install -r FILE`: every package FILE names is installed (not run: no network in CI)."""
    if '-r' not in argv:
        return
    for line in open(os.path.join(repo, argv[argv.index('-r') + 1])):
        name = re.split(r'[<>=!~\[; ]', line.split('#')[0].strip())[0]
        if name:
            importlib.metadata.version(name)  # raises PackageNotFoundError if it is not


def test_readme_commands_run(tmp_path):
    repo = tmp_path / 'repo'
    copy_repository(repo)
    books = make_books(random.Random(0))
    # the offline command's folder, where the README puts it: ../shared/data/pg19_mini of the clone
    for split, texts in books.items():
        os.makedirs(tmp_path / 'shared' / 'data' / 'pg19_mini' / split)
        for i, data in texts.items():
            (tmp_path / 'shared' / 'data' / 'pg19_mini' / split / f'{i}.txt').write_bytes(data)
    objects = {f'{split}/{i}.txt': data for split, texts in books.items() for i, data in texts.items()}
    objects['metadata.csv'] = b'11,A Made-up Book,1900,http://example.org/11\n'
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONDONTWRITEBYTECODE='1')
    commands = readme_commands((repo / 'README.md').read_text())
    ran = []
    with FakeBucket(objects) as bucket:
        for section, argv in commands:
            if argv[0] == 'pip':
                check_installed(argv, repo)
                continue
            script = argv[1]
            extra = list(QUICK.get(script, []))
            if script == 'data/pg19/prepare.py' and '--source' not in argv:
                extra.append(f'--base_url={bucket.base_url}')  # the download, from the fake bucket
            cmd = [sys.executable] + argv[1:] + extra
            p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
            assert p.returncode == 0, (f"README.md, {section}: `{shlex.join(argv)}` failed "
                                       f"(run as {shlex.join(cmd[1:])}):\n{(p.stdout + p.stderr)[-3000:]}")
            ran.append(script)
    # what the commands hand to each other exists
    for out in ('out-quickstart', 'out-tiny-tapa-small', 'out-tiny-rope', 'out-tiny-rope-ft4x-yarn'):
        assert (repo / out / 'ckpt.pt').exists(), out
    assert (repo / 'data' / 'pg19' / 'byte' / 'meta.json').exists()
    assert (repo / 'out-tiny-tapa-small' / 'ppl.json').exists() and (repo / 'out-tiny-rope' / 'ppl_yarn4.json').exists()
    assert {'rope_bias.png', 'tapa_decay.png', 'delta_hist.png', 'attention_maps.png'} <= set(os.listdir(repo / 'figures'))
    assert len(ran) == sum(argv[0] == 'python' for _, argv in commands)
