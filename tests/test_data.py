"""
Tests of the data pipeline: tokenizer.py, data/common.py, data/pg19/prepare.py (local folder and
HTTP download, against a fake bucket on 127.0.0.1) and data/pycode/prepare.py.

Prepared files are checked with independent code (np.fromfile, np.load, json, tiktoken or
bytes.decode directly), never with the readers under test. Everything is written under tmp_path.
"""

import base64
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.parse

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import tokenizer  # noqa: E402
from data import common  # noqa: E402
from data.pg19 import prepare as pg19  # noqa: E402
from data.pycode import prepare as pycode  # noqa: E402

PG19_MINI = os.path.normpath(os.path.join(REPO, '..', 'shared', 'data', 'pg19_mini'))
TIKTOKEN_CACHE = os.path.normpath(os.path.join(REPO, '..', 'shared', 'tiktoken_cache'))
if 'TIKTOKEN_CACHE_DIR' not in os.environ and os.path.isdir(TIKTOKEN_CACHE):
    os.environ['TIKTOKEN_CACHE_DIR'] = TIKTOKEN_CACHE  # the offline GPT-2 files, if present

needs_pg19_mini = pytest.mark.skipif(not os.path.isdir(PG19_MINI),
                                     reason=f"pg19_mini not found at {PG19_MINI}")


def gpt2_or_skip():
    try:
        import tiktoken
        return tiktoken.get_encoding('gpt2')
    except Exception as e:  # no tiktoken, or no BPE files offline
        pytest.skip(f"tiktoken GPT-2 files unavailable ({e}); set TIKTOKEN_CACHE_DIR")


def read_prepared(out_dir, split):
    """Independent reader: raw tokens, offsets and meta straight from the files."""
    tokens = np.fromfile(os.path.join(out_dir, f'{split}.bin'), dtype=np.uint16)
    offsets = np.load(os.path.join(out_dir, f'{split}.docs.npy'))
    with open(os.path.join(out_dir, 'meta.json')) as f:
        meta = json.load(f)
    return tokens, offsets, meta


def check_documents(out_dir, split, texts, tokenizer_name):
    """The split holds exactly `texts`, in order, each followed by one EOT, and meta agrees."""
    tokens, offsets, meta = read_prepared(out_dir, split)
    eot = {'byte': 0, 'gpt2': 50256}[tokenizer_name]
    assert meta['tokenizer'] == tokenizer_name and meta['eot_token'] == eot
    assert meta['vocab_size'] == {'byte': 256, 'gpt2': 50257}[tokenizer_name]
    assert meta['dtype'] == 'uint16'
    assert meta['splits'][split] == {'tokens': len(tokens), 'docs': len(texts)}
    assert offsets.dtype == np.int64 and offsets.shape == (len(texts) + 1,)
    assert offsets[0] == 0 and offsets[-1] == len(tokens)
    # EOT exactly at the end of each document and nowhere else
    assert np.array_equal(np.flatnonzero(tokens == eot), offsets[1:] - 1)
    if tokenizer_name == 'byte':
        decode = lambda t: bytes(t.astype(np.uint8)).decode('utf-8')  # noqa: E731
    else:
        enc = gpt2_or_skip()
        decode = lambda t: enc.decode(t.tolist())  # noqa: E731
    for i, text in enumerate(texts):
        got = decode(tokens[offsets[i]:offsets[i + 1] - 1])
        # a plain `assert got == text` would make pytest diff two whole books (minutes)
        if got != text:
            at = next((j for j, (x, y) in enumerate(zip(got, text)) if x != y), min(len(got), len(text)))
            pytest.fail(f"{split} document {i} differs from its source at character {at}: "
                        f"{got[at:at + 40]!r} vs {text[at:at + 40]!r} (lengths {len(got)}, {len(text)})")


def read_text(path):
    with open(path, 'rb') as f:
        return f.read().decode('utf-8')


# -----------------------------------------------------------------------------
# tokenizer.py

def test_byte_tokenizer():
    tok = tokenizer.get_tokenizer('byte')
    assert (tok.name, tok.vocab_size, tok.eot_token) == ('byte', 256, 0)
    text = "naïve café — 日本\r\n<|endoftext|>"
    ids = tok.encode(text)
    assert ids == list(text.encode('utf-8'))  # literal '<|endoftext|>' stays plain text
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids + [0], dtype=np.uint16)) == text  # EOT dropped, arrays ok
    assert tok.encode("a\x00b") == [97, 98]  # NUL is reserved for EOT
    assert tok.encode("a<|endoftext|>b", allow_eot=True) == [97, 0, 98]
    assert tok.decode([0xE6, 0x97]) == '\ufffd'  # half a character doesn't crash decode


def test_gpt2_tokenizer():
    gpt2_or_skip()
    tok = tokenizer.get_tokenizer('gpt2')
    assert (tok.name, tok.vocab_size, tok.eot_token) == ('gpt2', 50257, 50256)
    assert tok.encode("Hello world") == [15496, 995]  # well-known GPT-2 ids
    assert 50256 not in tok.encode("a<|endoftext|>b")  # ordinary text by default
    assert tok.encode("<|endoftext|>", allow_eot=True) == [50256]
    text = "naïve café — 日本\r\n"
    assert tok.decode(np.array(tok.encode(text), dtype=np.uint16)) == text


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'.*byte.*gpt2"):
        tokenizer.get_tokenizer('bpe')


def test_gpt2_offline_error_names_cache_dir(monkeypatch):
    tiktoken = pytest.importorskip('tiktoken')

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, 'get_encoding', offline)
    with pytest.raises(RuntimeError, match="TIKTOKEN_CACHE_DIR"):
        tokenizer.get_tokenizer('gpt2')


# -----------------------------------------------------------------------------
# data/common.py

def make_books(folder, texts):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, t in enumerate(texts):
        paths.append(os.path.join(folder, f'{i}.txt'))
        with open(paths[-1], 'wb') as f:
            f.write(t.encode('utf-8'))
    return paths


def test_prepare_splits_and_load_split(tmp_path):
    texts = {'train': ["first\r\ndoc é", "", "second doc"], 'validation': ["val 日本"]}
    out = str(tmp_path / 'data' / 'pg19' / 'byte')
    splits = {s: make_books(str(tmp_path / 'src' / s), t) for s, t in texts.items()}
    common.prepare_splits(out, 'pg19', 'byte', splits, source='unit test', num_proc=2, quiet=True)
    check_documents(out, 'train', ["first\r\ndoc é", "second doc"], 'byte')  # empty file skipped
    check_documents(out, 'validation', texts['validation'], 'byte')
    assert common.read_meta(out)['source'] == 'unit test'
    tokens, offsets = common.load_split(out, 'train')
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert np.array_equal(tokens, np.fromfile(os.path.join(out, 'train.bin'), dtype=np.uint16))
    assert offsets.tolist() == [0, len("first\r\ndoc é".encode()) + 1, len(tokens)]
    assert sorted(os.listdir(out)) == ['meta.json', 'train.bin', 'train.docs.npy',
                                       'validation.bin', 'validation.docs.npy']  # no temp files


def test_gpt2_pg19_hint_is_the_full_download(tmp_path):
    """The GPT-2 configs train a 124M model for ~2.6B tokens: the hint must not send them to the
    60-book sample (which exists only next to some checkouts anyway), but to the full download,
    naming --source DIR for a local copy."""
    cmd = common.prepare_command(str(tmp_path / 'data' / 'pg19' / 'gpt2'))
    assert cmd.startswith("python data/pg19/prepare.py --tokenizer gpt2")
    assert 'pg19_mini' not in cmd and '../shared' not in cmd
    assert 'downloads all of PG-19' in cmd and '--source DIR' in cmd
    with pytest.raises(FileNotFoundError, match=r"python data/pg19/prepare\.py --tokenizer gpt2 .*--source DIR"):
        common.read_meta(str(tmp_path / 'data' / 'pg19' / 'gpt2'))
    # --out_dir, when needed, comes before the note (the command stays one line to copy)
    cmd = common.prepare_command(str(tmp_path / 'elsewhere' / 'pg19' / 'gpt2'))
    assert cmd.index('--out_dir') < cmd.index('downloads all of PG-19')


def test_reader_errors_name_the_prepare_command(tmp_path):
    out = str(tmp_path / 'data' / 'pg19' / 'byte')
    cmd = "python data/pg19/prepare.py --tokenizer byte --source ../shared/data/pg19_mini"
    with pytest.raises(FileNotFoundError) as e:
        common.load_split(out, 'train')
    assert cmd in str(e.value)
    with pytest.raises(FileNotFoundError, match="python data/pycode/prepare.py --tokenizer gpt2"):
        common.read_meta(str(tmp_path / 'data' / 'pycode' / 'gpt2'))

    splits = {'train': make_books(str(tmp_path / 'src'), ["abc", "defg"])}
    common.prepare_splits(out, 'pg19', 'byte', splits, source='t', num_proc=1, quiet=True)
    with pytest.raises(ValueError, match="no split 'test'"):
        common.load_split(out, 'test')
    # offsets that don't end at len(tokens)
    np.save(os.path.join(out, 'train.docs.npy'), np.array([0, 4, 8], dtype=np.int64))
    with pytest.raises(ValueError, match=r"inconsistent.*offsets") as e:
        common.load_split(out, 'train')
    assert cmd in str(e.value)
    # a .bin shorter than meta.json says
    np.save(os.path.join(out, 'train.docs.npy'), np.array([0, 4, 9], dtype=np.int64))
    with open(os.path.join(out, 'train.bin'), 'r+b') as f:
        f.truncate(4)
    with pytest.raises(ValueError, match="holds 2 tokens, meta.json says 9"):
        common.load_split(out, 'train')
    # an index that is no array of offsets (here pickled objects, which are never loaded)
    with open(os.path.join(out, 'train.bin'), 'r+b') as f:
        f.write(b'\0' * 18)
    np.save(os.path.join(out, 'train.docs.npy'), np.array([{'a': 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"inconsistent: .*train\.docs\.npy is not a document index") as e:
        common.load_split(out, 'train')
    assert cmd in str(e.value)
    open(os.path.join(out, 'train.docs.npy'), 'wb').close()  # an empty file: numpy's EOFError
    with pytest.raises(ValueError, match=r"train\.docs\.npy is not a document index"):
        common.load_split(out, 'train')
    # a split with no tokens at all, consistent with its meta.json: said so, not numpy's "cannot mmap"
    meta = common.read_meta(out)
    meta['splits']['train'] = {**meta['splits']['train'], 'tokens': 0, 'docs': 0}
    with open(os.path.join(out, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    open(os.path.join(out, 'train.bin'), 'wb').close()
    with pytest.raises(ValueError, match=r"train\.bin is empty"):
        common.load_split(out, 'train')


def test_preparing_some_splits_keeps_the_others_of_the_same_source(tmp_path):
    out = str(tmp_path / 'data' / 'pg19' / 'byte')
    texts = {'train': ["train doc", "another"], 'validation': ["val doc"]}
    splits = {s: make_books(str(tmp_path / 'src' / s), t) for s, t in texts.items()}
    common.prepare_splits(out, 'pg19', 'byte', splits, source='a', num_proc=1, quiet=True)
    # again, validation only (prepare.py --splits validation), with new text: train is still listed
    new_val = {'validation': make_books(str(tmp_path / 'src2'), ["new val"])}
    common.prepare_splits(out, 'pg19', 'byte', new_val, source='a', num_proc=1, quiet=True)
    check_documents(out, 'validation', ["new val"], 'byte')
    check_documents(out, 'train', texts['train'], 'byte')
    # from another source the old split is not vouched for: it would mix two sources
    common.prepare_splits(out, 'pg19', 'byte', new_val, source='b', num_proc=1, quiet=True)
    assert list(common.read_meta(out)['splits']) == ['validation']


def test_interrupted_prepare_leaves_no_meta(tmp_path):
    out = str(tmp_path / 'data' / 'pg19' / 'byte')
    good = {'train': make_books(str(tmp_path / 'a'), ["abc"])}
    common.prepare_splits(out, 'pg19', 'byte', good, source='t', num_proc=1, quiet=True)
    assert os.path.exists(os.path.join(out, 'meta.json'))
    # a second prepare that dies in its second split (a file that isn't UTF-8)
    bad = str(tmp_path / 'bad.txt')
    with open(bad, 'wb') as f:
        f.write(b'caf\xe9')
    splits = {'train': good['train'], 'validation': [bad]}
    with pytest.raises(ValueError, match="not valid UTF-8"):
        common.prepare_splits(out, 'pg19', 'byte', splits, source='t', num_proc=1, quiet=True)
    with pytest.raises(FileNotFoundError, match="python data/pg19/prepare.py"):
        common.read_meta(out)  # the old meta.json must not vouch for the new files


def test_damaged_meta_is_a_clear_error(tmp_path):
    out = str(tmp_path / 'data' / 'pg19' / 'byte')
    common.prepare_splits(out, 'pg19', 'byte', {'train': make_books(str(tmp_path / 'a'), ["abc"])},
                          source='t', num_proc=1, quiet=True)
    with open(os.path.join(out, 'meta.json'), 'w') as f:
        f.write('{"tokenizer": "byte", ')  # cut short
    with pytest.raises(ValueError, match=r"meta\.json is not valid JSON .*damaged\. Prepare it again:\n"
                                         r"    python data/pg19/prepare.py"):
        common.read_meta(out)


# -----------------------------------------------------------------------------
# data/pg19/prepare.py from a local folder

def first_books(split, n):
    names = sorted(os.listdir(os.path.join(PG19_MINI, split)), key=lambda s: int(s[:-4]))
    return [os.path.join(PG19_MINI, split, s) for s in names[:n]]


@needs_pg19_mini
@pytest.mark.parametrize('tok,num_books', [('byte', 2), ('gpt2', 1)])
def test_pg19_prepare_from_source(tmp_path, tok, num_books):
    if tok == 'gpt2':
        gpt2_or_skip()
    out = str(tmp_path / tok)
    # run it exactly as a user would, which also checks the script finds the repo's modules
    cmd = [sys.executable, os.path.join(REPO, 'data', 'pg19', 'prepare.py'), '--tokenizer', tok,
           '--source', PG19_MINI, '--num_books', str(num_books), '--out_dir', out,
           '--num_proc', '2', '--quiet']
    subprocess.run(cmd, check=True, cwd=str(tmp_path), timeout=120)
    meta = json.load(open(os.path.join(out, 'meta.json')))
    assert meta['dataset'] == 'pg19' and list(meta['splits']) == ['train', 'validation', 'test']
    for split in ('train', 'validation', 'test'):
        # numeric order: train starts 33, 76 (a string sort would put 1080 first)
        paths = first_books(split, num_books)
        check_documents(out, split, [read_text(p) for p in paths], tok)
    assert [os.path.basename(p) for p in first_books('train', 2)] == ['33.txt', '76.txt']


# -----------------------------------------------------------------------------
# data/pg19/prepare.py downloading, from a fake bucket on 127.0.0.1

BUCKET = 'deepmind-gutenberg'


class FakeBucket:
    """Serves objects like storage.googleapis.com: /<bucket>/<name> with Range support, and the
    JSON listing at /storage/v1/b/<bucket>/o?prefix=... in pages of two. Objects named in
    cut_once get their body cut off halfway the first time they are asked for in full."""

    def __init__(self, objects, cut_once=(), listed_size=None, listed_md5=None):
        self.objects = objects
        self.cut_once = set(cut_once)
        self.listed_size = listed_size or {}
        self.listed_md5 = listed_md5 or {}
        self.log = []  # (name, Range header) per object request, ('LIST', query) per listing
        bucket = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10  # a stuck client can't hold a handler thread forever

            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                if url.path == f'/storage/v1/b/{BUCKET}/o':
                    bucket.log.append(('LIST', url.query))
                    return self.listing(urllib.parse.parse_qs(url.query))
                name = urllib.parse.unquote(url.path[len(f'/{BUCKET}/'):])
                if not url.path.startswith(f'/{BUCKET}/') or name not in bucket.objects:
                    return self.send_error(404)
                data = bucket.objects[name]
                rng = self.headers.get('Range')
                bucket.log.append((name, rng))
                if rng:
                    start = int(rng.split('=')[1].split('-')[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header('Content-Range', f'bytes */{len(data)}')
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
                    body = data[start:]
                else:
                    self.send_response(200)
                    body = data
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                if name in bucket.cut_once and not rng:
                    bucket.cut_once.discard(name)
                    self.wfile.write(body[:len(body) // 2])
                    return  # HTTP/1.0: returning closes the connection, mid-body
                self.wfile.write(body)

            def listing(self, query):
                prefix = query['prefix'][0]
                start = int(query.get('pageToken', ['0'])[0])
                names = sorted(n for n in bucket.objects if n.startswith(prefix))
                page = {'items': [{
                    'name': n,
                    'size': str(bucket.listed_size.get(n, len(bucket.objects[n]))),
                    'md5Hash': bucket.listed_md5.get(n, base64.b64encode(
                        hashlib.md5(bucket.objects[n]).digest()).decode()),
                } for n in names[start:start + 2]]}
                if start + 2 < len(names):
                    page['nextPageToken'] = str(start + 2)
                body = json.dumps(page).encode()
                self.send_response(200)
                self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f'http://127.0.0.1:{self.server.server_address[1]}/{BUCKET}/'

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, kwargs={'poll_interval': 0.05},
                         daemon=True).start()
        # whatever happens in the test, the server stops itself after a minute
        self.timer = threading.Timer(60, self.server.shutdown)
        self.timer.daemon = True
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(pg19, 'BACKOFF', 0.01)
    monkeypatch.setattr(pg19, 'RETRIES', 3)
    monkeypatch.setattr(pg19, 'CHUNK', 4096)  # several reads per file, so a cut-off lands mid-way


def fake_book(i, n_bytes):
    line = f"Book {i}: It was a dark and stormy night; café ☂.\r\n"
    return (line * (n_bytes // len(line.encode()) + 1)).encode('utf-8')


def test_download_resumes_after_cutoff(tmp_path, fast_retries):
    data = fake_book(1, 300_000)
    with FakeBucket({'train/1.txt': data}, cut_once={'train/1.txt'}) as bucket:
        dest = str(tmp_path / 'train' / '1.txt')
        pg19.download_file(bucket.base_url + 'train/1.txt', dest, len(data))
    assert open(dest, 'rb').read() == data
    assert not os.path.exists(dest + '.part')
    # first a full request that got cut off, then one Range request from where it stopped
    assert len(bucket.log) == 2 and bucket.log[0] == ('train/1.txt', None)
    assert bucket.log[1][1] is not None, "the second request should have resumed with a Range"
    start = int(bucket.log[1][1].split('=')[1].rstrip('-'))
    assert 0 < start <= len(data) // 2


def test_download_detects_wrong_size_and_checksum(tmp_path, fast_retries):
    a, b = fake_book(1, 5000), fake_book(2, 5000)
    objects = {'train/1.txt': a, 'train/2.txt': b}
    bad_md5 = base64.b64encode(hashlib.md5(b'something else').digest()).decode()
    with FakeBucket(objects, listed_size={'train/1.txt': len(a) + 7},
                    listed_md5={'train/2.txt': bad_md5}) as bucket:
        dest = str(tmp_path / '1.txt')
        with pytest.raises(pg19.DownloadError, match=f"server has {len(a)} bytes but the listing "
                                                     f"says {len(a) + 7}"):
            pg19.download_file(bucket.base_url + 'train/1.txt', dest, len(a) + 7)
        assert not os.path.exists(dest)
        dest = str(tmp_path / '2.txt')
        with pytest.raises(pg19.DownloadError, match="MD5 checksum mismatch"):
            pg19.download_file(bucket.base_url + 'train/2.txt', dest, len(b), bad_md5)
        assert not os.path.exists(dest) and not os.path.exists(dest + '.part')
        with pytest.raises(pg19.DownloadError, match="HTTP 404"):
            pg19.download_file(bucket.base_url + 'train/3.txt', str(tmp_path / '3.txt'), 10)


def test_pg19_download_end_to_end(tmp_path, fast_retries):
    ids = {'train': [100, 9, 10, 2], 'validation': [7], 'test': [30, 4]}
    objects = {f'{s}/{i}.txt': fake_book(i, 2000 + 97 * i) for s in ids for i in ids[s]}
    objects['metadata.csv'] = b'9,Book Nine,1900,http://example.org/9\n'
    objects['train/README'] = b'not a book'  # listed but not <id>.txt: must be ignored
    raw, out = str(tmp_path / 'raw'), str(tmp_path / 'out')
    with FakeBucket(objects, cut_once={'train/10.txt'}) as bucket:
        argv = ['--tokenizer', 'byte', '--base_url', bucket.base_url, '--download_dir', raw,
                '--out_dir', out, '--num_books', '3', '--num_proc', '1', '--quiet']
        pg19.main(argv)
        n_requests = len(bucket.log)
        # everything is complete and the listings cached: a second run needs no network at all
        pg19.main(argv)
        assert len(bucket.log) == n_requests
    # first three by numeric id (2, 9, 10; a string sort would give 10, 100, 2)
    expected = {'train': [2, 9, 10], 'validation': [7], 'test': [4, 30]}
    for split, want in expected.items():
        check_documents(out, split, [objects[f'{split}/{i}.txt'].decode() for i in want], 'byte')
        assert sorted(os.listdir(os.path.join(raw, split))) == sorted(f'{i}.txt' for i in want)
    assert open(os.path.join(raw, 'metadata.csv'), 'rb').read() == objects['metadata.csv']
    # listings: train in 3 pages of 2 (5 objects), validation 1, test 1, metadata.csv 1
    assert sum(name == 'LIST' for name, _ in bucket.log) == 6
    assert ('train/10.txt', None) in bucket.log and any(
        name == 'train/10.txt' and rng for name, rng in bucket.log)  # resumed after the cut


# -----------------------------------------------------------------------------
# data/pycode/prepare.py

def test_pycode_split_hash_is_stable():
    # fixed expectations: a file's split must never change between runs, machines or versions
    for rel, split in [('json/decoder.py', 'train'), ('argparse.py', 'train'),
                       ('reprlib.py', 'validation'), ('sched.py', 'validation')]:
        bucket = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 100  # independent
        assert (bucket < 5) == (split == 'validation')
        assert pycode.split_of(rel) == split


def test_pycode_prepare_deterministic(tmp_path):
    a = pycode.prepare('byte', out_dir=str(tmp_path / 'a'), num_proc=1, quiet=True)
    b = pycode.prepare('byte', out_dir=str(tmp_path / 'b'), num_proc=2, quiet=True)
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b)) == ['meta.json', 'train.bin', 'train.docs.npy',
                                              'validation.bin', 'validation.docs.npy']
    for n in names:
        assert open(os.path.join(a, n), 'rb').read() == open(os.path.join(b, n), 'rb').read(), n
    # known files land, whole, in the split their hash says, and not in the other one
    import sysconfig
    stdlib = sysconfig.get_paths()['stdlib']
    docs = {}
    for split in ('train', 'validation'):
        tokens, offsets, meta = read_prepared(a, split)
        assert meta['dataset'] == 'pycode' and offsets[-1] == len(tokens)
        assert np.array_equal(np.flatnonzero(tokens == 0), offsets[1:] - 1)
        docs[split] = {bytes(tokens[offsets[i]:offsets[i + 1] - 1].astype(np.uint8))
                       for i in range(len(offsets) - 1)}
    for rel, split in [('json/decoder.py', 'train'), ('reprlib.py', 'validation')]:
        with open(os.path.join(stdlib, rel), 'rb') as f:
            content = f.read()
        other = 'train' if split == 'validation' else 'validation'
        assert content in docs[split] and content not in docs[other]


def test_pg19_prepare_wrong_source_is_one_clear_line(tmp_path, monkeypatch, capsys):
    """--source that is not a folder of train/ validation/ test/: argparse's one-line error (exit 2),
    naming the folder as seen from the current directory, not a traceback."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        pg19.main(['--tokenizer', 'byte', '--source', 'shared/pg19_mini', '--quiet'])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"shared/pg19_mini/train does not exist (from {tmp_path}: {tmp_path}/shared/pg19_mini/train)" in err
    assert 'train/ validation/ test/' in err


def test_pg19_prepare_bad_out_dir_num_proc_or_empty_split_is_one_line(tmp_path, capsys):
    src = tmp_path / 'src'
    for split, text in (('train', 'some words'), ('validation', '')):  # every validation book empty
        (src / split).mkdir(parents=True)
        (src / split / '1.txt').write_text(text)
    (tmp_path / 'afile').write_text('x')
    for args, message in ((['--out_dir', str(tmp_path / 'afile')], 'is a file: give a folder'),
                          (['--num_proc', '-2'], '--num_proc -2: at least 1 process'),
                          (['--out_dir', str(tmp_path / 'o'), '--splits', 'train', 'validation'],
                           "split 'validation' has no non-empty documents")):
        with pytest.raises(SystemExit) as e:
            pg19.main(['--tokenizer', 'byte', '--source', str(src), '--quiet', '--splits', 'train', *args])
        assert e.value.code == 2 and message in capsys.readouterr().err
