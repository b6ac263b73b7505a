"""
Shared pieces of the data pipeline.

Writing (used by every data/<name>/prepare.py):
    prepare_splits(out_dir, dataset, tokenizer_name, {'train': [paths], ...}, source, num_proc)
tokenizes the text files of each split in parallel and writes, per the data format:

    out_dir/<split>.bin       flat np.uint16 tokens, every document followed by the EOT token
    out_dir/<split>.docs.npy  np.int64 offsets, shape (n_docs+1,): doc i = tokens[off[i]:off[i+1]]
    out_dir/meta.json         dataset, tokenizer, vocab_size, eot_token, dtype, splits, source

Reading (used by train/eval scripts):
    meta = read_meta(data_dir)
    tokens, offsets = load_split(data_dir, 'train')   # tokens is a read-only np.memmap

Two properties matter more than speed here:
- Streaming: tokens are appended to the .bin file one document at a time, so a split far bigger
  than RAM (full PG-19 is ~3B GPT-2 tokens) never has to be held in memory.
- Atomic: every file is written under a temporary name and renamed into place (os.replace is
  atomic), and meta.json is removed first and written last. An interrupted prepare therefore
  leaves no meta.json, and the readers refuse a folder without one.
"""

import json
import os
from multiprocessing import Pool

import numpy as np

DTYPE = np.uint16  # GPT-2's 50257 tokens (and bytes' 256) fit in 16 bits: half the disk of int32


def default_num_proc():
    return max(1, min(8, os.cpu_count() or 1))


# -----------------------------------------------------------------------------
# tokenizing documents in parallel

# Each worker process builds its own tokenizer once (tiktoken objects are not meant to be
# shared across processes), in the Pool initializer below.
_worker_tokenizer = None


def _init_worker(tokenizer_name):
    global _worker_tokenizer
    from tokenizer import get_tokenizer
    _worker_tokenizer = get_tokenizer(tokenizer_name)


def _tokenize_file(path):
    """Read one UTF-8 text file and return its tokens + EOT as a uint16 array (None if empty)."""
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        # decode the bytes ourselves rather than open(..., 'r'): text mode would turn '\r\n'
        # into '\n' and the tokens would no longer decode to the file's exact contents
        text = raw.decode('utf-8')
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8: {e}") from e
    if not text:
        return None
    ids = _worker_tokenizer.encode(text)
    out = np.empty(len(ids) + 1, dtype=DTYPE)
    out[:-1] = ids
    out[-1] = _worker_tokenizer.eot_token
    return out


def tokenize_files(paths, tokenizer_name, num_proc=None):
    """Yield one token array per file (None for an empty file), in the order of `paths`,
    whatever the number of processes, so the output is deterministic."""
    num_proc = num_proc or default_num_proc()
    if num_proc == 1 or len(paths) <= 1:
        # no pool: simpler to debug, and no process start-up cost for tiny inputs
        _init_worker(tokenizer_name)
        for p in paths:
            yield _tokenize_file(p)
        return
    # big chunks cut inter-process chatter for many small files (pycode); 1 for a few big books
    chunksize = max(1, min(32, len(paths) // (num_proc * 8)))
    with Pool(num_proc, initializer=_init_worker, initargs=(tokenizer_name,)) as pool:
        # imap (not imap_unordered) returns results in input order
        yield from pool.imap(_tokenize_file, paths, chunksize=chunksize)


# -----------------------------------------------------------------------------
# writing

def _save_npy_atomic(path, arr):
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:  # a file object, so np.save doesn't append '.npy' to the name
        np.save(f, arr)
    os.replace(tmp, path)


def write_split(out_dir, split, paths, tokenizer_name, num_proc=None, quiet=False):
    """Tokenize `paths` (one document per file) into out_dir/<split>.bin and .docs.npy.
    Returns {'tokens': n_tokens, 'docs': n_docs}."""
    from tqdm import tqdm
    bin_path = os.path.join(out_dir, f'{split}.bin')
    offsets = [0]
    # The .bin file is just the raw uint16 array, exactly what np.memmap(dtype=np.uint16) reads.
    # We append document by document instead of pre-sizing an np.memmap, because the total
    # token count isn't known until everything has been tokenized.
    with open(bin_path + '.tmp', 'wb') as f:
        docs = tokenize_files(paths, tokenizer_name, num_proc)
        for arr in tqdm(docs, total=len(paths), desc=f'{split:>10}', unit='doc', disable=quiet):
            if arr is None:
                continue  # empty file: no document (a lone EOT would only be noise)
            arr.tofile(f)
            offsets.append(offsets[-1] + len(arr))
    if len(offsets) == 1:
        os.remove(bin_path + '.tmp')
        raise ValueError(f"split {split!r} has no non-empty documents; nothing to write")
    os.replace(bin_path + '.tmp', bin_path)
    _save_npy_atomic(os.path.join(out_dir, f'{split}.docs.npy'), np.array(offsets, dtype=np.int64))
    return {'tokens': offsets[-1], 'docs': len(offsets) - 1}


def write_meta(out_dir, meta):
    path = os.path.join(out_dir, 'meta.json')
    with open(path + '.tmp', 'w') as f:
        json.dump(meta, f, indent=2)
        f.write('\n')
    os.replace(path + '.tmp', path)


def check_ours(out_dir, dataset):
    """Refuse to write into a folder whose token files a prepare step of this dataset did not write:
    they are someone's data (a --out_dir or --data_dir pointed at the wrong folder). Ours are vouched
    for by meta.json, or, after an interrupted prepare, by the .prepare note written before any file."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    found = sorted(n for n in names if n.endswith(('.bin', '.docs.npy')))
    owners = []
    for name in ('meta.json', '.prepare'):
        try:
            with open(os.path.join(out_dir, name)) as f:
                owners.append(json.load(f).get('dataset'))
        except (OSError, ValueError, AttributeError):
            pass
    if found and dataset not in owners:
        whose = f"they belong to {owners[0]!r}" if owners else "no meta.json of a prepare step vouches for them"
        raise ValueError(f"{out_dir} holds token files ({', '.join(found[:3])}) that preparing {dataset} did not write "
                         f"({whose}): refusing to overwrite them. Choose another --out_dir, or pass --overwrite "
                         f"to replace them")


def prepare_splits(out_dir, dataset, tokenizer_name, split_paths, source, num_proc=None, quiet=False,
                   overwrite=False):
    """Tokenize every split of a dataset into out_dir and write meta.json last.
    split_paths: {split name: list of text file paths, one document each}, in the wanted order.
    Token files there that this dataset's prepare did not write are an error (check_ours) unless overwrite."""
    from tokenizer import get_tokenizer
    tok = get_tokenizer(tokenizer_name)  # fail early (e.g. tiktoken offline) before any work
    assert tok.vocab_size <= np.iinfo(DTYPE).max + 1, "tokens must fit in uint16"
    if num_proc is not None and num_proc < 1:
        raise ValueError(f"num_proc={num_proc}: at least 1 process")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir {out_dir} is a file: give a folder for the token files")
    if not overwrite:
        check_ours(out_dir, dataset)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, '.prepare'), 'w') as f:  # ours from now on, even if interrupted
        json.dump({'dataset': dataset, 'tokenizer': tok.name}, f)
    # an older meta.json would vouch for files we are about to overwrite: remove it first (keeping
    # what it says of the splits not prepared now, e.g. `--splits validation`: see below)
    old_meta = None
    if os.path.exists(os.path.join(out_dir, 'meta.json')):
        try:
            with open(os.path.join(out_dir, 'meta.json')) as f:
                old_meta = json.load(f)
        except (OSError, ValueError):
            pass
        os.remove(os.path.join(out_dir, 'meta.json'))
    splits = {}
    for split, paths in split_paths.items():
        splits[split] = write_split(out_dir, split, paths, tokenizer_name, num_proc, quiet)
    # The other splits already in out_dir stay usable if they came from the same data, tokenizer and
    # source; otherwise they would mix sources, and the new meta.json leaves them out.
    if isinstance(old_meta, dict) and all(old_meta.get(k) == v for k, v in (
            ('dataset', dataset), ('tokenizer', tok.name), ('vocab_size', tok.vocab_size), ('source', source))):
        for split, entry in old_meta.get('splits', {}).items():
            if split not in splits and os.path.exists(os.path.join(out_dir, f'{split}.bin')):
                splits[split] = entry
    meta = {
        'dataset': dataset,
        'tokenizer': tok.name,
        'vocab_size': tok.vocab_size,
        'eot_token': tok.eot_token,
        'dtype': 'uint16',
        'splits': splits,
        'source': source,
    }
    write_meta(out_dir, meta)
    os.remove(os.path.join(out_dir, '.prepare'))  # meta.json vouches for the folder from now on
    if not quiet:
        for split, s in splits.items():
            print(f"{split}: {s['docs']:,} docs, {s['tokens']:,} tokens")
        print(f"wrote {out_dir}")
    return meta


# -----------------------------------------------------------------------------
# reading (train/eval scripts)

def prepare_command(data_dir):
    """The command that (re)creates data_dir, for error messages. Assumes the standard layout
    data/<dataset>/<tokenizer>/ and that commands are run from the repository root."""
    data_dir = os.path.normpath(data_dir)
    tokenizer = os.path.basename(data_dir)
    dataset = os.path.basename(os.path.dirname(data_dir))
    if not os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), dataset, 'prepare.py')):
        # not the data/<dataset>/<tokenizer>/ layout: we can't guess which dataset it was
        return f"python data/<dataset>/prepare.py --out_dir {data_dir}"
    cmd = f"python data/{dataset}/prepare.py"
    if tokenizer in ('gpt2', 'byte'):
        cmd += f" --tokenizer {tokenizer}"
    note = ''
    if dataset == 'pg19' and tokenizer == 'gpt2':
        # the GPT-2 configs train a 124M model for ~2.6B tokens: they need the whole benchmark (the
        # 60-book sample would be ~290 epochs of it), and the sample is not on every machine anyway
        note = "   # downloads all of PG-19 (11 GB); offline, add --source DIR (a local copy of it)"
    elif dataset == 'pg19':
        # the tiny byte-level models: the 60-book sample next to this repository is enough; leave
        # --source out (or point it elsewhere) to download the benchmark instead
        cmd += " --source ../shared/data/pg19_mini"
    if data_dir != os.path.join('data', dataset, tokenizer) and not data_dir.endswith(
            os.sep + os.path.join('data', dataset, tokenizer)):
        cmd += f" --out_dir {data_dir}"
    return cmd + note


def read_meta(data_dir):
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no prepared data in {data_dir} ({path} is missing; an interrupted prepare leaves "
            f"none either). Prepare it first:\n    {prepare_command(data_dir)}")
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the folder is damaged. Prepare it again:\n"
                         f"    {prepare_command(data_dir)}") from None
    fields = {'tokenizer': str, 'vocab_size': int, 'eot_token': int, 'splits': dict}
    wrong = [k for k, t in fields.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), t)]
    wrong += [f"splits.{s}" for s, e in (meta.get('splits') or {}).items() if not isinstance(e, dict)
              or not all(isinstance(e.get(k), int) for k in ('tokens', 'docs'))] if not wrong else []
    if wrong:
        raise ValueError(f"{path} is not the meta.json a prepare step writes ({', '.join(wrong)} missing or of "
                         f"the wrong type): the folder is damaged. Prepare it again:\n    {prepare_command(data_dir)}")
    return meta


def load_split(data_dir, split):
    """Return (tokens, offsets) of one split: tokens a read-only np.memmap of uint16 (nothing is
    read into RAM until sliced), offsets an int64 array with document i = tokens[off[i]:off[i+1]].
    Checks the files against meta.json so a stale or broken folder fails loudly here."""
    meta = read_meta(data_dir)
    cmd = prepare_command(data_dir)
    if split not in meta['splits']:
        raise ValueError(f"{data_dir} has no split {split!r} (it has {list(meta['splits'])}). "
                         f"To re-prepare it:\n    {cmd}")
    bin_path = os.path.join(data_dir, f'{split}.bin')
    docs_path = os.path.join(data_dir, f'{split}.docs.npy')
    for p in (bin_path, docs_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} is missing. Prepare the data again:\n    {cmd}")

    def broken(why):
        return ValueError(f"prepared data in {data_dir} is inconsistent: {why}. "
                          f"Prepare it again:\n    {cmd}")

    expected = meta['splits'][split]
    n_tokens = os.path.getsize(bin_path) // np.dtype(DTYPE).itemsize
    if meta.get('dtype') != 'uint16' or os.path.getsize(bin_path) % np.dtype(DTYPE).itemsize:
        raise broken(f"{bin_path} is not a uint16 token file")
    if n_tokens != expected['tokens']:
        raise broken(f"{bin_path} holds {n_tokens} tokens, meta.json says {expected['tokens']}")
    if n_tokens == 0:
        raise broken(f"{bin_path} is empty (its split has no tokens)")
    try:
        offsets = np.load(docs_path)  # (allow_pickle stays False: a token index holds no objects)
    except (ValueError, OSError, EOFError) as e:  # (EOFError: an empty file)
        raise broken(f"{docs_path} is not a document index ({(str(e).splitlines() or [''])[0][:80]})") from None
    if offsets.ndim != 1 or len(offsets) != expected['docs'] + 1:
        raise broken(f"{docs_path} has shape {offsets.shape}, expected ({expected['docs'] + 1},)")
    if offsets[0] != 0 or offsets[-1] != n_tokens:
        raise broken(f"offsets run from {offsets[0]} to {offsets[-1]}, expected 0 to {n_tokens}")
    if not np.all(np.diff(offsets) > 0):
        raise broken(f"{docs_path} offsets are not strictly increasing")
    tokens = np.memmap(bin_path, dtype=DTYPE, mode='r')
    # every document ends with EOT (reads one token per document, cheap even for big splits)
    if not np.all(tokens[offsets[1:] - 1] == meta['eot_token']):
        raise broken("some document does not end with the EOT token")
    # every token within the vocabulary, or the model's embedding lookup fails mid-run (one read of
    # the file, in chunks: about a second per GB)
    top = max(int(tokens[i:i + 2**24].max()) for i in range(0, n_tokens, 2**24))
    if top >= meta['vocab_size']:
        raise broken(f"{bin_path} holds token {top}, outside the vocabulary of {meta['vocab_size']} that meta.json "
                     f"declares")
    return tokens, offsets
