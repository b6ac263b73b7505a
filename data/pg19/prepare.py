"""
Prepare PG-19 (Rae et al. 2019, "Compressive Transformers for Long-Range Sequence Modelling"):
Project Gutenberg books published before 1919, whole books as documents (~69k words on average),
which makes it the standard benchmark for long-context language modelling.

Offline, from a local folder laid out like the benchmark (train/ validation/ test/ of <id>.txt):
    python data/pg19/prepare.py --tokenizer byte --source ../shared/data/pg19_mini
With internet, from the public bucket the authors publish (11 GB of text, 28,752 books):
    python data/pg19/prepare.py --tokenizer gpt2 --num_books 100

The bucket https://storage.googleapis.com/deepmind-gutenberg/ holds
    metadata.csv                 no header; columns: book id, short book title, publication date, url
    train/<id>.txt               28,602 books
    validation/<id>.txt          50 books
    test/<id>.txt                100 books
Which books are in a split is simply which files are under its prefix, so we ask the Google
Cloud Storage JSON API for the listing (https://storage.googleapis.com/storage/v1/b/deepmind-
gutenberg/o?prefix=train/), which also gives each file's size and MD5: every download is
checked against both. Downloads go to --download_dir (data/pg19/raw by default) in the same
layout, resume where they stopped (HTTP Range requests into a .part file), retry with backoff,
and are skipped on the next run once complete.

Books are always taken in order of numeric id, so --num_books N means the same N books on every
machine. Output: data/pg19/<tokenizer>/{train,validation,test}.bin, .docs.npy and meta.json.
"""

import argparse
import base64
import hashlib
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

# make the repository root importable when run as `python data/pg19/prepare.py`
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
from data.common import check_ours, default_num_proc, prepare_splits  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BASE_URL = 'https://storage.googleapis.com/deepmind-gutenberg/'
SPLITS = ('train', 'validation', 'test')

# download behaviour (module globals, so a test can shorten the waits)
RETRIES = 5         # consecutive failed attempts before giving up on a file
BACKOFF = 1.0       # seconds before the first retry, doubled after each further failure
TIMEOUT = 60        # seconds without any data before a connection counts as failed
CHUNK = 1 << 20     # read/write 1 MiB at a time


class DownloadError(RuntimeError):
    """A download problem that retrying will not fix (wrong size, bad checksum, HTTP 404...)."""


# -----------------------------------------------------------------------------
# book order

def book_sort_key(name):
    """'train/1228.txt' or '1228.txt' -> sort by the numeric id (so 9 < 10 < 100)."""
    stem = os.path.splitext(os.path.basename(name))[0]
    return (0, int(stem), stem) if stem.isdigit() else (1, 0, stem)


def local_split_files(source, split, num_books=None):
    """The <id>.txt files of one split of a local folder, in numeric id order, first num_books."""
    folder = os.path.join(source, split)
    if not os.path.isdir(folder):
        where = '' if os.path.isabs(folder) else f" (from {os.getcwd()}: {os.path.abspath(folder)})"
        raise FileNotFoundError(f"{folder} does not exist{where}: --source must be a folder holding "
                                f"{'/ '.join(SPLITS)}/ subfolders of <id>.txt books")
    names = sorted((n for n in os.listdir(folder) if n.endswith('.txt')), key=book_sort_key)
    if not names:
        raise FileNotFoundError(f"no .txt books in {folder}")
    return [os.path.join(folder, n) for n in names[:num_books]]


# -----------------------------------------------------------------------------
# downloading (standard library only)

def listing_url(base_url):
    """https://storage.googleapis.com/<bucket>/ -> the GCS JSON API object listing of <bucket>."""
    u = urllib.parse.urlsplit(base_url)
    bucket = u.path.strip('/').split('/')[0]
    return f"{u.scheme}://{u.netloc}/storage/v1/b/{bucket}/o"


def _is_transient(e):
    """Worth retrying? Timeouts, resets, 5xx: yes. 404 and other client errors: no."""
    if isinstance(e, urllib.error.HTTPError):
        return e.code >= 500 or e.code in (408, 429)
    return isinstance(e, (urllib.error.URLError, OSError, http.client.HTTPException))


def _get_json(url):
    for attempt in range(RETRIES + 1):
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
                return json.load(resp)
        except Exception as e:
            if not _is_transient(e) or attempt == RETRIES:
                raise DownloadError(f"could not fetch {url}: {e}") from e
            time.sleep(BACKOFF * 2 ** attempt)


def fetch_listing(base_url, prefix):
    """All objects under `prefix` as [{'name', 'size', 'md5Hash'}], following the pages."""
    items, token = [], None
    for _ in range(10_000):  # 1000 objects a page: far more pages than PG-19 needs
        query = {'prefix': prefix, 'maxResults': 1000,
                 'fields': 'items(name,size,md5Hash),nextPageToken'}
        if token:
            query['pageToken'] = token
        page = _get_json(listing_url(base_url) + '?' + urllib.parse.urlencode(query))
        items += page.get('items', [])
        token = page.get('nextPageToken')
        if not token:
            return items
    raise DownloadError(f"listing of {prefix} never ended")


def _md5_base64(path):
    h = hashlib.md5()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(CHUNK), b''):
            h.update(block)
    return base64.b64encode(h.digest()).decode()


def _server_total(resp, start):
    """The full file size the server reports (None if it doesn't say)."""
    if resp.status == 206:  # Content-Range: bytes <start>-<end>/<total>
        m = re.match(r'bytes (\d+)-\d+/(\d+)', resp.headers.get('Content-Range', ''))
        if not m or int(m.group(1)) != start:
            raise DownloadError(f"{resp.url}: unexpected Content-Range "
                                f"{resp.headers.get('Content-Range')!r} for a resume at byte {start}")
        return int(m.group(2))
    length = resp.headers.get('Content-Length')
    return int(length) if length is not None else None


def download_file(url, dest, size, md5=None, progress=None):
    """Download url to dest, expecting exactly `size` bytes (and, if given, the base64 MD5 that
    GCS lists). Resumable: bytes land in dest + '.part', which a later attempt (or a later run)
    continues with an HTTP Range request; only a complete, verified file is renamed to dest.
    progress: an optional tqdm bar counting bytes."""
    if os.path.exists(dest) and os.path.getsize(dest) == size:
        if progress is not None:
            progress.update(size)
        return dest  # already complete from an earlier run
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    part = dest + '.part'
    have = os.path.getsize(part) if os.path.exists(part) else 0
    if have > size:  # can't be a prefix of the right file: start over
        os.remove(part)
        have = 0
    if progress is not None:
        progress.update(have)
    failures = 0
    while have < size:
        start = have
        try:
            headers = {'Range': f'bytes={have}-'} if have else {}
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                        timeout=TIMEOUT) as resp:
                if have and resp.status != 206:
                    # the server ignored our Range and sends the whole file: start the part over
                    if progress is not None:
                        progress.update(-have)
                    have = start = 0
                total = _server_total(resp, have)
                if total is not None and total != size:
                    raise DownloadError(
                        f"{url}: the server has {total} bytes but the listing says {size}. If "
                        f"the bucket changed, delete the cached *.listing.json next to "
                        f"{os.path.dirname(dest)} and run again.")
                with open(part, 'ab' if have else 'wb') as f:
                    for chunk in iter(lambda: resp.read(CHUNK), b''):
                        if have + len(chunk) > size:
                            raise DownloadError(f"{url}: the server sent more than the {size} "
                                                f"bytes the listing promised")
                        f.write(chunk)
                        have += len(chunk)
                        if progress is not None:
                            progress.update(len(chunk))
            error = None if have == size else 'connection closed early'
        except DownloadError:
            raise
        except urllib.error.HTTPError as e:
            if e.code == 416:  # "range not satisfiable": our .part is no prefix of the file
                os.remove(part)
                if progress is not None:
                    progress.update(-have)
                have = 0
                error = e
            elif not _is_transient(e):
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
            else:
                error = e
        except Exception as e:
            if not _is_transient(e):
                raise
            error = e
        if error is not None:
            # a cut-off transfer that made progress isn't a strike: only stalls count
            failures = 1 if have > start else failures + 1
            if failures > RETRIES:
                raise DownloadError(f"{url}: giving up after {RETRIES} retries ({error}); run "
                                    f"again to resume from byte {have}")
            time.sleep(BACKOFF * 2 ** (failures - 1))
    if md5 is not None and _md5_base64(part) != md5:
        os.remove(part)
        raise DownloadError(f"{url}: MD5 checksum mismatch (the partial download was deleted; "
                            f"run again to download it afresh)")
    os.replace(part, dest)
    return dest


def download_split(base_url, split, download_dir, num_books=None, workers=8, quiet=False):
    """Download (or find already downloaded) the first num_books books of a split, in numeric id
    order. Returns their local paths in that order."""
    from tqdm import tqdm
    # cache the listing, so a second run over complete downloads needs no network at all
    cache = os.path.join(download_dir, f'{split}.listing.json')
    if os.path.exists(cache):
        with open(cache) as f:
            items = json.load(f)
    else:
        items = fetch_listing(base_url, split + '/')
        os.makedirs(download_dir, exist_ok=True)
        with open(cache + '.tmp', 'w') as f:
            json.dump(items, f)
        os.replace(cache + '.tmp', cache)
    books = [it for it in items if re.fullmatch(rf'{split}/\d+\.txt', it['name'])]
    if not books:
        raise DownloadError(f"no books listed under {split}/ at {listing_url(base_url)}")
    books = sorted(books, key=lambda it: book_sort_key(it['name']))[:num_books]
    dests = [os.path.join(download_dir, *it['name'].split('/')) for it in books]
    total = sum(int(it['size']) for it in books)
    with tqdm(total=total, unit='B', unit_scale=True, desc=f'download {split}', disable=quiet) as bar:
        def get(i):
            it = books[i]
            url = base_url + urllib.parse.quote(it['name'])
            return download_file(url, dests[i], int(it['size']), it.get('md5Hash'), bar)
        with ThreadPoolExecutor(max(1, workers)) as pool:
            list(pool.map(get, range(len(books))))  # list() re-raises the first error
    return dests


def download_metadata(base_url, download_dir):
    """metadata.csv (titles, publication dates) alongside the books; kept for reference."""
    dest = os.path.join(download_dir, 'metadata.csv')
    if os.path.exists(dest):
        return dest  # only ever renamed into place once complete and verified
    items = [it for it in fetch_listing(base_url, 'metadata.csv') if it['name'] == 'metadata.csv']
    if not items:
        raise DownloadError(f"metadata.csv is not listed at {listing_url(base_url)}")
    return download_file(base_url + 'metadata.csv', dest, int(items[0]['size']),
                         items[0].get('md5Hash'))


# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tokenizer', default='gpt2', choices=['gpt2', 'byte'])
    parser.add_argument('--source', default=None,
                        help='local folder of train/ validation/ test/ <id>.txt (no download)')
    parser.add_argument('--num_books', type=int, default=None,
                        help='use the first N books (by id) of each split (default: all)')
    parser.add_argument('--splits', nargs='+', default=list(SPLITS), choices=SPLITS)
    parser.add_argument('--out_dir', default=None, help='default: data/pg19/<tokenizer>')
    parser.add_argument('--num_proc', type=int, default=default_num_proc(),
                        help='tokenizer processes (default: min(8, cpu count))')
    parser.add_argument('--download_dir', default=os.path.join(HERE, 'raw'),
                        help='where downloaded books are kept (default: data/pg19/raw)')
    parser.add_argument('--base_url', default=BASE_URL)
    parser.add_argument('--download_workers', type=int, default=8,
                        help='parallel downloads')
    parser.add_argument('--quiet', action='store_true', help='no progress bars')
    parser.add_argument('--overwrite', action='store_true', help='replace token files in out_dir that were not '
                        'prepared from PG-19')
    args = parser.parse_args(argv)
    if args.num_books is not None and args.num_books < 1:
        parser.error('--num_books must be at least 1')
    if args.num_proc < 1:  # (before any download)
        parser.error(f'--num_proc {args.num_proc}: at least 1 process')
    out_dir = args.out_dir or os.path.join(HERE, args.tokenizer)
    if not args.base_url.endswith('/'):
        args.base_url += '/'

    if not args.overwrite:
        try:  # before any download: someone's token files in out_dir end the run at once
            check_ours(out_dir, 'pg19')
        except ValueError as e:
            parser.error(str(e))
    t0 = time.time()
    if args.source:
        try:
            split_paths = {s: local_split_files(args.source, s, args.num_books) for s in args.splits}
        except FileNotFoundError as e:  # a wrong --source: one line, as argparse reports bad options
            parser.error(str(e))
        where = os.path.abspath(args.source)
    else:
        download_metadata(args.base_url, args.download_dir)
        split_paths = {s: download_split(args.base_url, s, args.download_dir, args.num_books,
                                         args.download_workers, args.quiet) for s in args.splits}
        where = args.base_url
    t1 = time.time()
    books = 'all books' if args.num_books is None else f'first {args.num_books} books by id'
    try:  # (a bad --num_proc or --out_dir, or a split whose books are all empty: one line)
        meta = prepare_splits(out_dir, 'pg19', args.tokenizer, split_paths,
                              source=f"PG-19 from {where} ({books} per split)",
                              num_proc=args.num_proc, quiet=args.quiet, overwrite=args.overwrite)
    except ValueError as e:
        parser.error(str(e))
    if not args.quiet:
        print(f"took {time.time() - t0:.1f}s ({t1 - t0:.1f}s finding/downloading books)")
    return meta


if __name__ == '__main__':
    main()
