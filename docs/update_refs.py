"""
Refresh the line numbers of the links from docs/*.md into model.py, after model.py has changed.

    python docs/update_refs.py            # rewrite the stale links, print what changed
    python docs/update_refs.py --check    # only report; exit status 1 if any link is stale
    python docs/update_refs.py docs/other.md   # other docs (default: docs/positional_encodings.md)

A link is written [`name`](../model.py#L<start>-L<end>), where name is either
  - a function, class or method (`rope_frequencies`, `GPT.hidden`): the link covers its whole
    definition, from the `def`/`class` line to its last line (found with python's ast), or
  - a code snippet (anything that is not a plain dotted name, e.g. `inv_freq = inv_freq / factor`):
    the link starts at the one line holding the snippet (it must be on exactly one line of model.py)
    and keeps its old number of lines.
tests/test_viz.py checks every link independently of this script.
"""

import ast
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, '..', 'model.py')
LINK = re.compile(r'\[`([^`]+)`\]\(\.\./model\.py#L(\d+)-L(\d+)\)')
NAME = re.compile(r'[A-Za-z_][\w.]*')


def definitions(source):
    """{'name' or 'Class.method': (first line, last line)} for every def and class in the module."""
    spans = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qualified = prefix + child.name
                spans.setdefault(qualified, (child.lineno, child.end_lineno))
                visit(child, qualified + '.')
    visit(ast.parse(source), '')
    return spans


def resolve(name, start, end, lines, spans):
    """The (start, end) a link to `name` should have, or raise ValueError."""
    if NAME.fullmatch(name):
        if name not in spans:
            raise ValueError(f"`{name}` is not a function, class or method of model.py")
        return spans[name]
    hits = [i + 1 for i, line in enumerate(lines) if name in line]
    if len(hits) != 1:
        raise ValueError(f"the snippet `{name}` is on {len(hits)} lines of model.py; a snippet must be on "
                         f"exactly one (quote more of the line)")
    return hits[0], hits[0] + (end - start)


def update(doc_path, check_only=False):
    with open(MODEL) as f:
        source = f.read()
    lines, spans = source.split('\n'), definitions(source)
    with open(doc_path) as f:
        doc = f.read()
    changes, errors = [], []

    def fix(match):
        name, start, end = match.group(1), int(match.group(2)), int(match.group(3))
        try:
            new_start, new_end = resolve(name, start, end, lines, spans)
        except ValueError as e:
            errors.append(str(e))
            return match.group(0)
        if (new_start, new_end) != (start, end):
            changes.append(f"{name}: L{start}-L{end} -> L{new_start}-L{new_end}")
        return f"[`{name}`](../model.py#L{new_start}-L{new_end})"
    new_doc = LINK.sub(fix, doc)
    if not check_only and new_doc != doc:
        with open(doc_path, 'w') as f:
            f.write(new_doc)
    return changes, errors


def main():
    check_only = '--check' in sys.argv[1:]
    docs = [a for a in sys.argv[1:] if not a.startswith('--')] or [os.path.join(HERE, 'positional_encodings.md')]
    stale = False
    for name in docs:
        changes, errors = update(name, check_only)
        for line in changes:
            print(f"{name}: {line}" + (" (stale)" if check_only else ''))
        for line in errors:
            print(f"{name}: ERROR {line}")
        stale = stale or bool(errors) or (check_only and bool(changes))
    sys.exit(1 if stale else 0)


if __name__ == '__main__':
    main()
