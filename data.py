"""The SimpleAR sequence format in one place: text tokenizer, prompt template, image-token ids,
training sequences with caption dropout and code-shard preparation.

    python data.py prepare --meta data/shapes/meta.jsonl --vq checkpoints/nano/vq \\
        --resolution 256 --out data/shapes/codes     # the meta of `python shapes.py --out ...`
    torchrun --nproc_per_node 8 data.py prepare --meta M.jsonl --vq DIR --resolution 512 --out DIR
    python -m pytest -q tests/test_data.py

A training sequence (preprocess_t2i in wdrink/SimpleAR, simpar/train/preprocess.py: raw text, no
chat template, no BOS):

    <|t2i|> style-prefix caption <|soi|> img_0 ... img_{h*w-1}    normal
    <|t2i|> <|soi|> img_0 ... img_{h*w-1}                          caption dropout (p = 0.1)

A dropped sample has neither prefix nor caption. img_i = first_image_id + code_i in raster order.
The LM's vocabulary is the text tokenizer's ids followed by the codebook, nothing else: SimpleAR's
train.py resizes the embedding to len(tokenizer) + 64000 (151665 Qwen2.5 ids + its 7 special
tokens = 151672 = first_image_id), so vocab_size = text ids + codebook size, exactly, and
first_image_id checks that wherever an LM meets a visual tokenizer or code data. Labels equal the
input ids, text included (SimpleAR puts loss on every token); label t is the target of the logits
at t-1 (the Hugging Face convention: the loss shifts). At inference the prompt is
"<|t2i|>A highly realistic image of {caption}<|soi|>" (SimpleAR's generate.py) and the CFG branch
gets the negative *text* prompt below, not the empty caption the dropout trained.

    tok = load_text_tokenizer(ckpt_dir)
    first = first_image_id(vocab_size, codebook_size, tok.get_vocab_size())
    batches = iter(T2IBatches(CodeDataset(shard_dir), tok, first, batch_size, seed=0, rank=r,
                              world_size=w, codebook_size=codebook_size))
    batch = next(batches)  # input_ids, labels [B, T] long (-100: padding); attention_mask bool

Each rank pads to its own longest sequence, so for DDP runs to equal one large batch the loss must
be divided by the label count summed over all ranks, not averaged per rank.

Every text file read here (meta JSON/JSONL, tokenizer.json, vocab.json, merges.txt,
added_tokens.json, tokenizer_config.json, index.json, captions) may start with a UTF-8 byte-order
mark.
"""
import bisect
import json
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                        pre_tokenizers, trainers)
from tqdm import tqdm

from cli import Parser, run_main, write_atomic

# ------------------------------------------------------------------------------------ text side
# SimpleAR's order (wdrink/SimpleAR train.py, where it extends the vocabulary)
SPECIAL_TOKENS = ["<|t2i|>", "<|i2t|>", "<|soi|>", "<|vtokens|>", "<|t2v|>", "<|v2t|>", "<|sov|>"]
EOS_TOKEN = "<|endoftext|>"  # Qwen2's eos and pad token
PROMPT_PREFIX = "A highly realistic image of "
NEGATIVE_PROMPT = ("An image of aerial view, overexposed, low quality, deformation, "
                   "a poor composition, bad hands, bad teeth, bad eyes, bad limbs, distortion")
# SimpleAR's PROMPTS_GEN (simpar/train/preprocess.py after db7bff0): one drawn per training sample
STYLE_PREFIXES = [
    "A detailed digital painting of ", "A highly realistic image of ",
    "An abstract representation of ", "A fantasy illustration featuring ",
    "A photorealistic depiction of ", "A vibrant, colorful scene of ", "A surreal dreamscape of ",
    "A futuristic cityscape with ", "An epic landscape showcasing ",
    "A minimalistic black and white sketch of ", "A cinematic view of ",
    "An ethereal depiction of ", "A hyper-realistic portrayal of ",
    "An imaginative interpretation of ", "A whimsical illustration of ",
    "A magical world featuring ", "An iconic scene from ", "A steampunk-inspired version of ",
    "A vintage-style artwork of ", "A high-tech sci-fi scene with ",
]
# Qwen2's pre-tokenizer split (PRETOKENIZE_REGEX, transformers' models/qwen2/tokenization_qwen2.py):
# vocab.json + merges.txt need it to tokenize exactly like the tokenizer.json of a fast save.
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
               r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _qwen2_tokenizer(bpe: models.BPE) -> Tokenizer:
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def read_text(path) -> str:
    """A UTF-8 text file, without the byte-order mark that some editors write first."""
    with open(path, encoding="utf-8-sig") as f:
        return f.read()


def _read_json(path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _write_text(path, text) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _write_json(path, obj) -> None:
    """obj as JSON, through cli.write_atomic: a file that exists is complete (resuming needs it)."""
    text = json.dumps(obj)
    write_atomic(path, lambda tmp: _write_text(tmp, text))


def _read_tokenizer_json(path) -> Tokenizer:
    # Tokenizer.from_file refuses a byte-order mark: read the text here
    try:
        return Tokenizer.from_str(read_text(path))
    except Exception as e:  # the tokenizers library raises a bare Exception
        raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None


def _read_bpe(vocab_path, merges_path) -> models.BPE:
    """BPE.from_file's model, from files that may start with a byte-order mark (it refuses them)."""
    vocab = _read_json(vocab_path)
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise ValueError(f"{vocab_path}: not a mapping of tokens to ids")
    merges = []
    for n, line in enumerate(read_text(merges_path).split("\n"), 1):
        line = line.rstrip("\r")
        if not line or line.startswith("#version"):  # the header BPE.from_file skips too
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{merges_path}: line {n} is not two tokens and a space: {line!r}")
        merges.append(tuple(pair))
    try:
        return models.BPE(vocab, merges)
    except Exception as e:  # a merge of tokens outside the vocabulary
        raise ValueError(f"{vocab_path} + {merges_path}: {e}") from None


def _added_tokens(ckpt_dir, path) -> dict:
    """id -> AddedToken of a slow save: tokenizer_config.json's entries carry the flags,
    added_tokens.json only names the tokens."""
    added = {}
    if os.path.isfile(path("added_tokens.json")):
        for t, i in _read_json(path("added_tokens.json")).items():
            added[i] = AddedToken(t, special=True, normalized=False)
    if os.path.isfile(path("tokenizer_config.json")):
        decoder = _read_json(path("tokenizer_config.json")).get("added_tokens_decoder", {})
        for i, d in decoder.items():
            added[int(i)] = AddedToken(d["content"], single_word=d.get("single_word", False),
                                       lstrip=d.get("lstrip", False), rstrip=d.get("rstrip", False),
                                       normalized=d.get("normalized", False),
                                       special=d.get("special", True))
    return added


def load_text_tokenizer(ckpt_dir, add_special_tokens=False) -> Tokenizer:
    """The checkpoint's text tokenizer: tokenizer.json, or else vocab.json + merges.txt + the added
    tokens of added_tokens.json / tokenizer_config.json (what a slow Qwen2 tokenizer saves). Any of
    them may start with a UTF-8 byte-order mark. add_special_tokens=True appends missing
    SPECIAL_TOKENS, as SimpleAR's train.py does when it starts from Qwen2.5-Instruct."""
    path = lambda name: os.path.join(ckpt_dir, name)  # noqa: E731
    if os.path.isfile(path("tokenizer.json")):
        tok = _read_tokenizer_json(path("tokenizer.json"))
    elif os.path.isfile(path("vocab.json")) and os.path.isfile(path("merges.txt")):
        tok = _qwen2_tokenizer(_read_bpe(path("vocab.json"), path("merges.txt")))
        added = _added_tokens(ckpt_dir, path)
        for i in sorted(added):  # ids are assigned in order of addition: add in id order, check
            tok.add_tokens([added[i]])
            got = tok.token_to_id(added[i].content)
            if got != i:
                raise ValueError(f"{ckpt_dir}: added token {added[i].content!r} should have id "
                                 f"{i} but got {got} (added ids must follow the vocabulary "
                                 "without gaps)")
    else:
        raise FileNotFoundError(f"{ckpt_dir}: no tokenizer.json, nor vocab.json + merges.txt")
    if add_special_tokens:
        tok.add_special_tokens([t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None])
    return tok


def special_token_ids(tokenizer) -> dict:
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"the text tokenizer lacks SimpleAR's special token(s) {missing} "
                         "(load_text_tokenizer(..., add_special_tokens=True) adds them)")
    return ids


def pad_token_id(tokenizer) -> int:
    i = tokenizer.token_to_id(EOS_TOKEN)
    return 0 if i is None else i


def first_image_id(vocab_size, codebook_size, n_text_tokens=None) -> int:
    """Token id of code 0. THE image-token mapping: image id = first_image_id + code.

    The LM's vocabulary is the text tokenizer's ids, then one row per code. With n_text_tokens (the
    text tokenizer's size, added tokens included) vocab_size must be exactly n_text_tokens +
    codebook_size: an LM and a visual tokenizer (or code data) that do not belong together are an
    error, never a shifted window of rows. Without it, only room for one text token is checked."""
    if codebook_size <= 0:
        raise ValueError(f"the visual tokenizer's codebook size {codebook_size} is not positive")
    if n_text_tokens is not None:
        if n_text_tokens <= 0 or vocab_size != n_text_tokens + codebook_size:
            raise ValueError(f"the LM's {vocab_size:,} vocabulary rows are not the text "
                             f"tokenizer's {n_text_tokens:,} ids + the visual tokenizer's "
                             f"{codebook_size:,} codes (= {n_text_tokens + codebook_size:,}): "
                             "they do not belong together")
        return n_text_tokens
    first = vocab_size - codebook_size
    if first < 1:
        raise ValueError(f"vocab_size {vocab_size} - codebook_size {codebook_size} = {first} "
                         "leaves no room for a text token")
    return first


def _long(x) -> torch.Tensor:
    return x.long() if torch.is_tensor(x) else torch.from_numpy(np.array(x, dtype=np.int64))


def codes_to_tokens(codes, first_id) -> torch.Tensor:
    return _long(codes) + first_id


def tokens_to_codes(tokens, first_id, codebook_size) -> torch.Tensor:
    """Codes of image token ids; ids outside the image range are an error, never clamped (SimpleAR's
    generate.py clamps them)."""
    tokens = _long(tokens)
    bad = (tokens < first_id) | (tokens >= first_id + codebook_size)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} token id(s) outside the image range "
                         f"[{first_id}, {first_id + codebook_size}), e.g. {int(tokens[bad][0])}")
    return tokens - first_id


def build_prompt(caption, prefix=PROMPT_PREFIX) -> str:
    return "<|t2i|>" + prefix + caption + "<|soi|>"


def build_negative_prompt(text=NEGATIVE_PROMPT) -> str:
    return "<|t2i|>" + text + "<|soi|>"


def _tokens_spelled_in(tokenizer, texts) -> list:
    """The tokenizer's added tokens (SimpleAR's special tokens among them) that texts spell out."""
    decoder = getattr(tokenizer, "get_added_tokens_decoder", None)
    names = {t.content for t in decoder().values()} if decoder else set(SPECIAL_TOKENS)
    return sorted(t for t in names if t and any(t in s for s in texts))


def _warn_spelled_tokens(tokenizer, texts, what) -> None:
    found = _tokens_spelled_in(tokenizer, texts)
    if found:
        warnings.warn(f"{what} spells {', '.join(found)}: encoded as the special token(s), as "
                      "SimpleAR does, not as text", stacklevel=3)


def encode_prompts(tokenizer, prompts, prefix=PROMPT_PREFIX) -> list:
    """Token ids of SimpleAR's prompt "<|t2i|>{prefix}{p}<|soi|>" for each p; no BOS, whatever
    post-processor a tokenizer.json has.

    Each prompt is encoded with its template as one string, as SimpleAR's generate.py does, so text
    in a prompt that spells one of the tokenizer's added tokens (<|soi|>, <|t2i|>, <|endoftext|>,
    ...) becomes that token, not its characters. That is kept on purpose: it is what the released
    models were trained and evaluated on. A call whose prompts do so warns once (warnings.warn,
    naming the tokens)."""
    _warn_spelled_tokens(tokenizer, [prefix, *prompts], "a prompt")
    texts = [build_prompt(p, prefix) for p in prompts]
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def encode_negative(tokenizer, text=NEGATIVE_PROMPT) -> list:
    """Token ids of "<|t2i|>{text}<|soi|>"; added tokens spelled in text are treated (and warned
    about) as in encode_prompts."""
    _warn_spelled_tokens(tokenizer, [text], "the negative prompt")
    return tokenizer.encode(build_negative_prompt(text), add_special_tokens=False).ids


# --------------------------------------------------------------------------- training sequences
def check_first_id(tokenizer, first_id) -> None:
    """Image ids follow the text ids: first_id must be the text tokenizer's size (as
    first_image_id returns it)."""
    n_text = tokenizer.get_vocab_size()
    if first_id != n_text:
        raise ValueError(f"first image id {first_id:,} is not the text tokenizer's size "
                         f"{n_text:,}: image ids follow the text ids (data.first_image_id)")


def _check_codes(codes: torch.Tensor, codebook_size) -> None:
    if codebook_size is not None and codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= codebook_size:
            raise ValueError(f"codes {lo}..{hi} are outside the codebook's 0..{codebook_size - 1}")


def make_sequence(tokenizer, caption, codes, first_id, prefix=PROMPT_PREFIX, drop=False,
                  text_loss=True, max_len=None, codebook_size=None):
    """(input_ids, labels), both long [T], of one training sample; codes [h, w] (or flat) in raster
    order, checked against codebook_size when it is given. first_id must be the tokenizer's size.
    Over max_len, the caption's tail is cut, never image tokens (SimpleAR's collator would cut
    those). Added tokens spelled in a caption become those tokens, as in encode_prompts."""
    check_first_id(tokenizer, first_id)
    sp = special_token_ids(tokenizer)
    codes = _long(codes)
    _check_codes(codes, codebook_size)
    image = codes_to_tokens(codes, first_id).flatten()
    # Encoded as one piece, like SimpleAR's single string: added tokens split the text, so this
    # equals encoding "<|t2i|>" + prefix + caption + "<|soi|>"; a prefix's trailing space joins
    # the caption's first word.
    text = [] if drop else tokenizer.encode(prefix + caption, add_special_tokens=False).ids
    if max_len is not None and 2 + len(text) + len(image) > max_len:
        room = max_len - 2 - len(image)
        need = 0 if drop else len(tokenizer.encode(prefix, add_special_tokens=False).ids)
        if room < need:
            what = "" if drop else f" and the prefix {prefix!r}"
            raise ValueError(f"max_len {max_len} cannot hold {len(image)} image tokens, the "
                             f"template{what}")
        text = text[:room]
    ids = torch.cat([torch.tensor([sp["<|t2i|>"], *text, sp["<|soi|>"]]), image])
    labels = ids.clone()
    if not text_loss:
        labels[:len(text) + 2] = -100  # only image tokens are targets; the first follows <|soi|>
    return ids, labels


def collate(seqs, pad_id) -> dict:
    """Right-pad (input_ids, labels) pairs to the longest: input_ids/labels [B, T] long,
    attention_mask [B, T] bool."""
    B = len(seqs)
    T = max(len(ids) for ids, _ in seqs)
    batch = dict(input_ids=torch.full((B, T), pad_id, dtype=torch.long),
                 labels=torch.full((B, T), -100, dtype=torch.long),
                 attention_mask=torch.zeros(B, T, dtype=torch.bool))
    for b, (ids, labels) in enumerate(seqs):
        batch["input_ids"][b, :len(ids)] = ids
        batch["labels"][b, :len(ids)] = labels
        batch["attention_mask"][b, :len(ids)] = True
    return batch


class T2IBatches:
    """Endless, resumable stream of one rank's training batches over a map-style dataset of
    (captions, codes) (a CodeDataset, or a plain list; captions is a str or a list of str, one drawn
    per use).

    Epoch e visits torch.randperm(n, seed + e) in global batches of batch_size * world_size; rank r
    takes the contiguous slice [r*b, (r+1)*b) of each, so 2 ranks x b see the samples of 1 rank x
    2b, and the tail (n mod global batch) is dropped so every rank takes as many steps. A sample's
    dropout, prefix and caption draws come from a generator seeded with (seed, epoch, position in
    the epoch), never the rank: both runs build the very same sequences, and the whole stream state
    is (epoch, position), which state_dict holds.

    first_id must be the tokenizer's size (first_image_id). codebook_size, the LM's: a dataset that
    records another one (CodeDataset.codebook_size) is refused, and every sample's codes must lie
    in it.
    """

    def __init__(self, dataset, tokenizer, first_id, batch_size, *, seed=0, rank=0, world_size=1,
                 p_drop_cond=0.1, prefixes=STYLE_PREFIXES, text_loss=True, max_len=None,
                 shuffle=True, codebook_size=None):
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size {batch_size} and world_size {world_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
        check_first_id(tokenizer, first_id)
        recorded = getattr(dataset, "codebook_size", None)
        if codebook_size is not None and recorded is not None and recorded != codebook_size:
            raise ValueError(f"the data holds codes of a {recorded:,}-code visual tokenizer, the "
                             f"LM has {codebook_size:,} code rows")
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.first_id = first_id
        self.codebook_size = codebook_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.p_drop_cond = p_drop_cond
        self.prefixes = list(prefixes)
        self.text_loss = text_loss
        self.max_len = max_len
        self.shuffle = shuffle
        self.pad_id = pad_token_id(tokenizer)
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = len(dataset) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"dataset of {len(dataset)} samples is smaller than one global batch "
                             f"({batch_size} x {world_size} ranks)")
        self.epoch = 0
        self.position = 0  # samples of this epoch's order consumed by all ranks together

    def order(self, epoch) -> torch.Tensor:
        n = len(self.dataset)
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))

    def sequence(self, epoch, position, index):
        captions, codes = self.dataset[index]
        captions = [captions] if isinstance(captions, str) else captions
        # always 3 draws: each stays independent of the others' use
        u = np.random.default_rng([self.seed, epoch, position]).random(3)
        caption = captions[int(u[1] * len(captions))]
        prefix = self.prefixes[int(u[2] * len(self.prefixes))]
        return make_sequence(self.tokenizer, caption, codes, self.first_id, prefix,
                             bool(u[0] < self.p_drop_cond), self.text_loss, self.max_len,
                             self.codebook_size)

    def __iter__(self):
        while True:
            order = self.order(self.epoch)
            while self.position + self.global_batch <= self.steps_per_epoch * self.global_batch:
                start = self.position + self.rank * self.batch_size
                positions = range(start, start + self.batch_size)
                seqs = [self.sequence(self.epoch, p, int(order[p])) for p in positions]
                # before yielding: a state saved after this batch resumes at the next
                self.position += self.global_batch
                yield collate(seqs, self.pad_id)
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, position=self.position, seed=self.seed, n=len(self.dataset))

    def load_state_dict(self, state):
        fits = (state["seed"], state["n"]) == (self.seed, len(self.dataset))
        if not fits or state["position"] % self.global_batch:
            raise ValueError(f"loader state {state} does not fit seed {self.seed}, "
                             f"{len(self.dataset)} samples and global batch {self.global_batch}")
        self.epoch = state["epoch"]
        self.position = state["position"]


# ---------------------------------------------------------------------------------- code shards
class _Rows:
    """Rows of several (memory-mapped) shard arrays seen as one sequence."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays]).tolist()

    def __len__(self):
        return self.starts[-1]

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        k = bisect.bisect_right(self.starts, i) - 1  # the last shard starting at or before i
        return self.arrays[k][i - self.starts[k]]


def load_code_shards(root):
    """(codes: rows of [h, w] uint16/int32, memory-mapped; captions: list of caption lists) of a
    prepared directory."""
    if not os.path.isfile(os.path.join(root, "index.json")):
        raise FileNotFoundError(f"{root}: no index.json (run `python data.py prepare` until every "
                                "shard is done)")
    index = _read_json(os.path.join(root, "index.json"))
    codes = []
    captions = []
    for shard in index["shards"]:
        codes.append(np.load(os.path.join(root, shard["codes"]), mmap_mode="r"))
        captions += _read_json(os.path.join(root, shard["captions"]))
        if len(codes[-1]) != shard["count"]:
            raise ValueError(f"{root}/{shard['codes']}: {len(codes[-1])} rows, index.json says "
                             f"{shard['count']}")
    if len(captions) != index["count"]:
        raise ValueError(f"{root}: {len(captions)} captions, index.json says {index['count']}")
    return _Rows(codes), captions


class CodeDataset:
    """Map-style dataset over a prepare_codes directory: item i = (captions list, codes [h, w]).
    codebook_size: the visual tokenizer's that wrote the codes (index.json), None if unrecorded."""

    def __init__(self, root):
        self.codes, self.captions = load_code_shards(root)
        # resolution, grid, codebook_size, ...
        self.index = _read_json(os.path.join(root, "index.json"))
        self.codebook_size = self.index.get("codebook_size")

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return self.captions[i], self.codes[i]


def read_meta(meta_path) -> list:
    """Records of a JSON list or a JSONL file (either may start with a byte-order mark); an
    unparsable JSONL line becomes None (a bad record, skipped later)."""
    text = read_text(meta_path)
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path}: {e}") from None
    records = []
    for line in filter(str.strip, text.splitlines()):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            records.append(None)
    return records


def _record_fields(rec):
    """(skip reason or None, image path, captions) of one meta record, without opening the image.
    image_path: the key of SimpleAR's metas."""
    image = rec.get("image", rec.get("image_path")) if isinstance(rec, dict) else None
    if not isinstance(image, str) or "caption" not in rec:
        return "bad_record", None, None
    captions = [rec["caption"]] if isinstance(rec["caption"], str) else rec["caption"]
    texts = isinstance(captions, list) and captions
    if not texts or not all(isinstance(c, str) and c.strip() for c in captions):
        return "caption_not_text", None, None
    return None, image, [c.strip() for c in captions]


def _load_record(rec, root, resolution, pil_to_tensor):
    """(skip reason or None, captions, image [3, R, R] in [-1, 1]) of one meta record."""
    reason, image, captions = _record_fields(rec)
    if reason:
        return reason, None, None
    try:
        with Image.open(os.path.join(root, image)) as im:
            im = im.convert("RGB")  # decodes now, so a broken file fails inside this try
    except FileNotFoundError:
        return "missing_image", None, None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return "unreadable_image", None, None
    return None, captions, pil_to_tensor(im, resolution)


def _check_records(records, meta_path) -> None:
    """A meta none of whose records names an image and a caption is an error (not a run that
    encodes 0 images); captions that spell SimpleAR's special tokens are warned about once."""
    fields = [_record_fields(r) for r in records]
    usable = [f for f in fields if f[0] is None]
    if not usable:
        reasons = sorted({f[0] for f in fields})
        raise ValueError(f"{meta_path}: none of its {len(records)} records has an image and a "
                         f"caption ({', '.join(reasons) or 'no records'}); expected a JSON list "
                         'or JSONL of {"image": path, "caption": str or [str]}')
    texts = [c for _, _, caps in usable for c in caps]
    found = sorted(t for t in SPECIAL_TOKENS + [EOS_TOKEN] if any(t in c for c in texts))
    if found:
        n = sum(any(t in c for t in found) for c in texts)
        warnings.warn(f"{meta_path}: {n} caption(s) spell {', '.join(found)}: a tokenizer with "
                      "those tokens encodes them as the tokens, as SimpleAR does, not as text",
                      stacklevel=3)


def _shard_names(k):
    return f"codes_{k:05d}.npy", f"captions_{k:05d}.json"


def prepare_codes(meta_path, out_dir, vq, resolution, shard_size=1024, batch_size=8, rank=0,
                  world_size=1, device="cpu"):
    """Encode a meta file's images into code shards; returns this rank's report.

    meta: JSON list or JSONL of {"image": path (relative to the meta's folder or absolute),
    "caption": str or [str]}; a meta without one such record is an error. Shard k holds records
    [k*shard_size, (k+1)*shard_size) minus the skipped ones, is encoded by rank k % world_size and
    written as codes_k.npy ([N, h, w], uint16 when the codebook fits, else int32) + captions_k.json
    (list of caption lists). Finished shards are kept, so a rerun redoes only missing ones. Bad
    records and unreadable images are skipped and counted by reason (report_rank{r}.json). The rank
    that finds every shard present writes index.json (with the codebook size, which an LM must
    match); rerunning prepare on a finished directory writes it if absent.
    vq: any object with .spatial_compression, .codebook_size and .encode(images [B, 3, R, R] in
    [-1, 1]) -> [B, h, w], e.g. a cosmos_tokenizer.CosmosTokenizer.
    """
    from cosmos_tokenizer import pil_to_tensor  # lazy: the rest of data.py needs no tokenizer

    for name, value in dict(resolution=resolution, shard_size=shard_size, batch_size=batch_size,
                            world_size=world_size).items():
        if value < 1:
            raise ValueError(f"{name} {value} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
    f = vq.spatial_compression
    if resolution % f:
        raise ValueError(f"resolution {resolution} is not divisible by the visual tokenizer's "
                         f"spatial compression {f}")
    codebook = getattr(vq, "codebook_size", None)
    if not isinstance(codebook, (int, np.integer)) or codebook < 1:
        raise ValueError(f"the visual tokenizer's codebook_size {codebook!r} is not a positive int "
                         "(index.json records it for the LM to match)")
    codebook = int(codebook)
    records = read_meta(meta_path)
    _check_records(records, meta_path)
    root = os.path.dirname(os.path.abspath(meta_path))
    grid = [resolution // f] * 2
    dtype = np.uint16 if codebook <= 1 << 16 else np.int32
    settings = dict(resolution=resolution, grid=grid, codebook_size=codebook,
                    shard_size=shard_size, records=len(records))
    os.makedirs(out_dir, exist_ok=True)
    settings_path = os.path.join(out_dir, "prepare.json")
    # never mix shards of two setups
    if os.path.isfile(settings_path) and _read_json(settings_path) != settings:
        raise ValueError(f"{out_dir} holds shards prepared with {_read_json(settings_path)}, "
                         f"not {settings}; use another --out")
    _write_json(settings_path, settings)
    n_shards = math.ceil(len(records) / shard_size)

    def done(k):
        return all(os.path.isfile(os.path.join(out_dir, name)) for name in _shard_names(k))

    def load(rec):
        return _load_record(rec, root, resolution, pil_to_tensor)

    mine = [k for k in range(rank, n_shards, world_size) if not done(k)]
    report = dict(rank=rank, shards=mine, encoded=0, skipped={}, examples={})
    total = sum(len(records[k * shard_size:(k + 1) * shard_size]) for k in mine)
    bar = tqdm(total=total, desc=f"codes rank {rank}", disable=rank != 0)
    # threads: PIL decodes with the GIL released
    with ThreadPoolExecutor(4) as pool, torch.inference_mode():
        for k in mine:
            codes = []
            captions = []
            start = k * shard_size
            for b in range(start, min(start + shard_size, len(records)), batch_size):
                chunk = records[b:min(b + batch_size, start + shard_size)]
                loaded = list(pool.map(load, chunk))
                for i, (reason, _, _) in enumerate(loaded):
                    if reason:
                        report["skipped"][reason] = report["skipped"].get(reason, 0) + 1
                        examples = report["examples"].setdefault(reason, [])
                        if len(examples) < 5:  # record numbers (meta order) of the first few
                            examples.append(b + i)
                images = [img for reason, _, img in loaded if reason is None]
                if images:
                    c = vq.encode(torch.stack(images).to(device))
                    if c.numel() != len(images) * grid[0] * grid[1]:
                        raise ValueError(f"the visual tokenizer returned codes of shape "
                                         f"{tuple(c.shape)}, expected [{len(images)}, {grid[0]}, "
                                         f"{grid[1]}]")
                    codes.append(c.reshape(len(images), *grid).cpu().numpy())
                    captions += [caps for reason, caps, _ in loaded if reason is None]
                bar.update(len(chunk))
            codes = np.concatenate(codes) if codes else np.zeros((0, *grid), np.int64)
            if len(codes) and (codes.min() < 0 or codes.max() >= codebook):
                raise ValueError(f"the visual tokenizer returned codes outside [0, {codebook})")
            codes = codes.astype(dtype)
            codes_name, captions_name = _shard_names(k)
            # captions first: codes present => the shard is done
            _write_json(os.path.join(out_dir, captions_name), captions)
            write_atomic(os.path.join(out_dir, codes_name), lambda tmp: np.save(tmp, codes))
            report["encoded"] += len(captions)
    bar.close()
    complete = all(done(k) for k in range(n_shards))
    if complete:
        shards = [dict(codes=c, captions=t, count=len(_read_json(os.path.join(out_dir, t))))
                  for c, t in map(_shard_names, range(n_shards))]
        index = dict(settings, count=sum(s["count"] for s in shards), shards=shards)
        _write_json(os.path.join(out_dir, "index.json"), index)
    _write_json(os.path.join(out_dir, f"report_rank{rank}.json"), report)
    print(f"rank {rank}: encoded {report['encoded']} images into {len(mine)} shard(s), skipped "
          f"{report['skipped']} (record numbers: {report['examples']}); index.json "
          f"{'written' if complete else 'waits for other ranks'}")
    return report


# ------------------------------------------------------------------ a text tokenizer of our own
def train_bpe_tokenizer(texts, vocab_size, path) -> Tokenizer:
    """A Qwen2-style byte-level BPE trained on texts, plus <|endoftext|> and SPECIAL_TOKENS as added
    special tokens (after the vocabulary, like Qwen2.5), saved as path/tokenizer.json. vocab_size
    counts the 256 bytes and the merges."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size {vocab_size} must be >= 256 (the bytes alone)")
    tok = _qwen2_tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([EOS_TOKEN, *SPECIAL_TOKENS])
    os.makedirs(path, exist_ok=True)
    write_atomic(os.path.join(path, "tokenizer.json"), tok.save)
    return tok


# ------------------------------------------------------------------------------------------ CLI
def _check_counts(args, *names) -> None:
    for name in names:
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value} must be >= 1")


def _cli_prepare(args):
    _check_counts(args, "resolution", "shard_size", "batch_size")
    if not os.path.isfile(args.meta):
        raise FileNotFoundError(f"meta file {args.meta} not found")
    from cosmos_tokenizer import CosmosTokenizer

    local = os.environ.get("LOCAL_RANK", 0)
    device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    vq = CosmosTokenizer.from_pretrained(args.vq, device=device)
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    prepare_codes(args.meta, args.out, vq, args.resolution, args.shard_size, args.batch_size,
                  rank, world_size, device)


def get_parser() -> Parser:
    p = Parser(prog="data.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("prepare", help="encode a meta file's images into code shards")
    q.add_argument("--meta", required=True, help="JSON list or JSONL of {image, caption}")
    q.add_argument("--vq", required=True, help="visual tokenizer checkpoint directory")
    q.add_argument("--resolution", type=int, required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--shard-size", type=int, default=1024)
    q.add_argument("--batch-size", type=int, default=8)
    return p


def main(argv=None):
    run_main("data.py", _cli_prepare, get_parser().parse_args(argv))


if __name__ == "__main__":
    main()
