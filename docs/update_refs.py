"""
Refresh the line numbers of the links from docs/*.md into the code (model.py, fast_attention.py, any
.py file at the repository's top level), after the code has changed.

    python docs/update_refs.py            # rewrite the stale links, print what changed
    python docs/update_refs.py --check    # only report; exit status 1 if any link is stale
    python docs/update_refs.py docs/other.md   # other docs (default: docs/positional_encodings.md)

A link is written [`name`](../model.py#L<start>-L<end>) (or ../fast_attention.py...), where name is either
  - a function, class or method (`rope_frequencies`, `GPT.hidden`): the link covers its whole
    definition, from the `def`/`class` line to its last line (found with python's ast), or
  - a code snippet (anything that is not a plain dotted name, e.g. `inv_freq = inv_freq / factor`):
    the link starts at the one line holding the snippet (it must be on exactly one line of that file)
    and keeps its old number of lines.
tests/test_viz.py checks every link independently of this script.
"""

import ast
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, '..')
LINK = re.compile(r'\[`([^`]+)`\]\(\.\./(\w+\.py)#L(\d+)-L(\d+)\)')
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


def resolve(name, start, end, lines, spans, file):
    """The (start, end) a link to `name` should have, or raise ValueError."""
    if NAME.fullmatch(name):
        if name not in spans:
            raise ValueError(f"`{name}` is not a function, class or method of {file}")
        return spans[name]
    hits = [i + 1 for i, line in enumerate(lines) if name in line]
    if len(hits) != 1:
        raise ValueError(f"the snippet `{name}` is on {len(hits)} lines of {file}; a snippet must be on "
                         f"exactly one (quote more of the line)")
    return hits[0], hits[0] + (end - start)


def update(doc_path, check_only=False):
    with open(doc_path) as f:
        doc = f.read()
    changes, errors, code = [], [], {}

    def fix(match):
        name, file, start, end = match.group(1), match.group(2), int(match.group(3)), int(match.group(4))
        if file not in code:
            with open(os.path.join(ROOT, file)) as f:
                source = f.read()
            code[file] = source.split('\n'), definitions(source)
        try:
            new_start, new_end = resolve(name, start, end, *code[file], file)
        except ValueError as e:
            errors.append(str(e))
            return match.group(0)
        if (new_start, new_end) != (start, end):
            changes.append(f"{file} {name}: L{start}-L{end} -> L{new_start}-L{new_end}")
        return f"[`{name}`](../{file}#L{new_start}-L{new_end})"
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
