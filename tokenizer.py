"""
The two tokenizers this codebase knows about, behind one tiny interface:

    tok = get_tokenizer('gpt2')   # or 'byte'
    ids = tok.encode("Hello world")       # -> list[int]
    text = tok.decode(ids)                # -> str
    tok.vocab_size, tok.eot_token, tok.name

- 'gpt2': the GPT-2 BPE from tiktoken. vocab 50257, end-of-text token 50256.
- 'byte': the raw UTF-8 bytes of the text. vocab 256, end-of-text token 0 (the NUL byte,
  which never occurs in real text). No files to download, nothing to learn: ideal for a
  laptop CPU quick start, at the price of ~4x longer sequences than BPE.

The end-of-text (EOT) token separates documents in the prepared .bin files, so a document's own
tokens must never contain it. That is why encode() treats text as plain text by default: the
literal string '<|endoftext|>' inside a book is just 13 ordinary characters, not a document
break. Pass allow_eot=True (e.g. for a sampling prompt) to turn that literal string into EOT.
"""

EOT_STRING = '<|endoftext|>'


class ByteTokenizer:
    """UTF-8 bytes as tokens. Token 0 (NUL) is reserved as end-of-text."""

    name = 'byte'
    vocab_size = 256
    eot_token = 0

    def encode(self, text, allow_eot=False):
        if allow_eot:
            # the literal '<|endoftext|>' becomes the EOT token, like tiktoken's allowed_special
            parts = [self.encode(p) for p in text.split(EOT_STRING)]
            ids = parts[0]
            for p in parts[1:]:
                ids = ids + [self.eot_token] + p
            return ids
        # NUL is our EOT, so a stray NUL character in the text is dropped rather than
        # silently splitting the document in two. (Real text never contains it.)
        return list(text.encode('utf-8').replace(b'\x00', b''))

    def decode(self, ids):
        if hasattr(ids, 'tolist'):  # numpy array or torch tensor
            ids = ids.tolist()
        # drop EOT (NUL) and replace any broken UTF-8 (a model can emit half a character)
        return bytes(ids).replace(b'\x00', b'').decode('utf-8', errors='replace')


class GPT2Tokenizer:
    """The GPT-2 BPE via tiktoken. tiktoken downloads its two vocabulary files on first use;
    offline, point TIKTOKEN_CACHE_DIR at a folder that already holds them."""

    name = 'gpt2'

    def __init__(self):
        try:
            import tiktoken
        except ImportError as e:
            raise ImportError("the 'gpt2' tokenizer needs tiktoken: pip install tiktoken "
                              "(or use the 'byte' tokenizer, which needs nothing)") from e
        try:
            self.enc = tiktoken.get_encoding('gpt2')
        except Exception as e:
            # the usual cause: no internet and no local copy of the BPE files
            raise RuntimeError(
                f"tiktoken could not load the GPT-2 BPE files ({type(e).__name__}: {e}). "
                "tiktoken downloads them on first use; offline, set TIKTOKEN_CACHE_DIR to a "
                "folder holding them (e.g. export TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache), "
                "or use the 'byte' tokenizer.") from e
        self.vocab_size = self.enc.n_vocab      # 50257
        self.eot_token = self.enc.eot_token     # 50256

    def encode(self, text, allow_eot=False):
        if allow_eot:
            return self.enc.encode(text, allowed_special={EOT_STRING})
        # encode_ordinary: special-token strings in the text are encoded as plain text
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        if hasattr(ids, 'tolist'):
            ids = ids.tolist()
        return self.enc.decode(ids)  # tiktoken uses errors='replace'


TOKENIZERS = {'gpt2': GPT2Tokenizer, 'byte': ByteTokenizer}


def get_tokenizer(name):
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}: choose one of {sorted(TOKENIZERS)}")
    return TOKENIZERS[name]()
