"""The SimpleAR sequence format in one place: text tokenizer, prompt template, image-token ids,
training sequences with caption dropout, code-shard preparation and the synthetic shapes data.

    python data.py shapes --out data/shapes --n 20000 --size 256     # PNGs + meta.jsonl + tokenizer/tokenizer.json
    python data.py prepare --meta data/shapes/meta.jsonl --vq checkpoints/nano/vq --resolution 256 --out data/shapes/codes
    torchrun --nproc_per_node 8 data.py prepare --meta M.jsonl --vq DIR --resolution 512 --out DIR   # shards over ranks
    python -m pytest -q tests/test_data.py

A training sequence (SimpleAR preprocess_t2i: raw text, no chat template, no BOS):

    <|t2i|> style-prefix caption <|soi|> img_0 ... img_{h*w-1}    normal
    <|t2i|> <|soi|> img_0 ... img_{h*w-1}                          caption dropout (p = 0.1): prefix and caption gone

img_i = first_image_id + code_i in raster order, first_image_id = vocab_size - codebook_size (151672 for
SimpleAR: 151665 Qwen2.5 tokens + 7 added). Labels equal the input ids, text included (SimpleAR puts loss
on every token); label t is the target of the logits at t-1 (the Hugging Face convention: the loss shifts).
At inference the prompt is "<|t2i|>A highly realistic image of {caption}<|soi|>" and the CFG branch gets
the negative *text* prompt below, not the empty caption the dropout trained.

    tok = load_text_tokenizer(ckpt_dir)
    first = first_image_id(vocab_size, codebook_size, tok.get_vocab_size())
    batches = iter(T2IBatches(CodeDataset(shard_dir), tok, first, batch_size, seed=0, rank=r, world_size=w))
    batch = next(batches)  # input_ids, labels [B, T] long (-100 on padding), attention_mask [B, T] bool

Each rank pads to its own longest sequence, so for DDP runs to equal one large batch the loss must be
divided by the label count summed over all ranks, not averaged per rank.
"""
import argparse
import bisect
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageDraw
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tqdm import tqdm

# ----------------------------------------------------------------------------------------- text side
SPECIAL_TOKENS = ["<|t2i|>", "<|i2t|>", "<|soi|>", "<|vtokens|>", "<|t2v|>", "<|v2t|>", "<|sov|>"]  # SimpleAR's order
EOS_TOKEN = "<|endoftext|>"  # Qwen2's eos and pad token
PROMPT_PREFIX = "A highly realistic image of "
NEGATIVE_PROMPT = ("An image of aerial view, overexposed, low quality, deformation, a poor composition, "
                   "bad hands, bad teeth, bad eyes, bad limbs, distortion")
# SimpleAR's PROMPTS_GEN (simpar/train/preprocess.py after db7bff0): one is drawn per training sample.
STYLE_PREFIXES = [
    "A detailed digital painting of ", "A highly realistic image of ", "An abstract representation of ",
    "A fantasy illustration featuring ", "A photorealistic depiction of ", "A vibrant, colorful scene of ",
    "A surreal dreamscape of ", "A futuristic cityscape with ", "An epic landscape showcasing ",
    "A minimalistic black and white sketch of ", "A cinematic view of ", "An ethereal depiction of ",
    "A hyper-realistic portrayal of ", "An imaginative interpretation of ", "A whimsical illustration of ",
    "A magical world featuring ", "An iconic scene from ", "A steampunk-inspired version of ",
    "A vintage-style artwork of ", "A high-tech sci-fi scene with ",
]
# Qwen2's pre-tokenizer split (transformers' Qwen2 tokenizer): vocab.json + merges.txt need it to tokenize
# exactly like the tokenizer.json that a fast save writes.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def _qwen2_tokenizer(bpe: models.BPE) -> Tokenizer:
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_text_tokenizer(ckpt_dir, add_special_tokens=False) -> Tokenizer:
    """The checkpoint's text tokenizer: tokenizer.json, or else vocab.json + merges.txt + the added tokens of
    added_tokens.json / tokenizer_config.json (what a slow Qwen2 tokenizer saves). add_special_tokens=True appends
    missing SPECIAL_TOKENS, as SimpleAR's train.py does when it starts from Qwen2.5-Instruct."""
    path = lambda name: os.path.join(ckpt_dir, name)
    if os.path.isfile(path("tokenizer.json")):
        tok = Tokenizer.from_file(path("tokenizer.json"))
    elif os.path.isfile(path("vocab.json")) and os.path.isfile(path("merges.txt")):
        tok = _qwen2_tokenizer(models.BPE.from_file(path("vocab.json"), path("merges.txt")))
        added = {}  # id -> AddedToken; the config's entries carry the flags, added_tokens.json only names
        if os.path.isfile(path("added_tokens.json")):
            added = {i: AddedToken(t, special=True, normalized=False) for t, i in _read_json(path("added_tokens.json")).items()}
        if os.path.isfile(path("tokenizer_config.json")):
            for i, d in _read_json(path("tokenizer_config.json")).get("added_tokens_decoder", {}).items():
                added[int(i)] = AddedToken(d["content"], single_word=d.get("single_word", False), lstrip=d.get("lstrip", False),
                                           rstrip=d.get("rstrip", False), normalized=d.get("normalized", False),
                                           special=d.get("special", True))
        for i in sorted(added):  # ids are assigned in order of addition, so add in id order and check
            tok.add_tokens([added[i]])
            if tok.token_to_id(added[i].content) != i:
                raise ValueError(f"{ckpt_dir}: added token {added[i].content!r} should have id {i} but got "
                                 f"{tok.token_to_id(added[i].content)} (added ids must follow the vocabulary without gaps)")
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
    """Token id of code 0. THE image-token mapping: image id = first_image_id + code."""
    first, need = vocab_size - codebook_size, 1 if n_text_tokens is None else n_text_tokens
    if codebook_size <= 0 or first < need:
        raise ValueError(f"vocab_size {vocab_size} - codebook_size {codebook_size} = {first} leaves no room "
                         f"for {need} text token(s)")
    return first


def _long(x) -> torch.Tensor:
    return x.long() if torch.is_tensor(x) else torch.from_numpy(np.array(x, dtype=np.int64))


def codes_to_tokens(codes, first_id) -> torch.Tensor:
    return _long(codes) + first_id


def tokens_to_codes(tokens, first_id, codebook_size) -> torch.Tensor:
    """Codes of image token ids; ids outside the image range are an error, never clamped (SimpleAR clamps)."""
    tokens = _long(tokens)
    bad = (tokens < first_id) | (tokens >= first_id + codebook_size)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} token id(s) outside the image range [{first_id}, {first_id + codebook_size}), "
                         f"e.g. {int(tokens[bad][0])}")
    return tokens - first_id


def build_prompt(caption, prefix=PROMPT_PREFIX) -> str:
    return "<|t2i|>" + prefix + caption + "<|soi|>"


def build_negative_prompt(text=NEGATIVE_PROMPT) -> str:
    return "<|t2i|>" + text + "<|soi|>"


def encode_prompts(tokenizer, prompts, prefix=PROMPT_PREFIX) -> list:
    # add_special_tokens=False: SimpleAR's prompts carry no BOS, whatever post-processor a tokenizer.json has
    return [e.ids for e in tokenizer.encode_batch([build_prompt(p, prefix) for p in prompts], add_special_tokens=False)]


def encode_negative(tokenizer, text=NEGATIVE_PROMPT) -> list:
    return tokenizer.encode(build_negative_prompt(text), add_special_tokens=False).ids


# ----------------------------------------------------------------------------------------- training sequences
def make_sequence(tokenizer, caption, codes, first_id, prefix=PROMPT_PREFIX, drop=False, text_loss=True, max_len=None):
    """(input_ids, labels), both long [T], of one training sample; codes [h, w] (or flat) in raster order.
    Over max_len, the caption's tail is cut, never image tokens (SimpleAR's collator would cut those)."""
    sp = special_token_ids(tokenizer)
    image = codes_to_tokens(codes, first_id).flatten()
    # Encoded as one piece, like SimpleAR's single string: added tokens split the text, so this equals
    # encoding "<|t2i|>" + prefix + caption + "<|soi|>"; a prefix's trailing space joins the caption's first word.
    text = [] if drop else tokenizer.encode(prefix + caption, add_special_tokens=False).ids
    if max_len is not None and 2 + len(text) + len(image) > max_len:
        room = max_len - 2 - len(image)
        if room < (0 if drop else len(tokenizer.encode(prefix, add_special_tokens=False).ids)):
            raise ValueError(f"max_len {max_len} cannot hold {len(image)} image tokens, the template"
                             + ("" if drop else f" and the prefix {prefix!r}"))
        text = text[:room]
    ids = torch.cat([torch.tensor([sp["<|t2i|>"], *text, sp["<|soi|>"]]), image])
    labels = ids.clone()
    if not text_loss:
        labels[:len(text) + 2] = -100  # only image tokens are targets; the first is predicted from <|soi|>
    return ids, labels


def collate(seqs, pad_id) -> dict:
    """Right-pad (input_ids, labels) pairs to the longest: input_ids/labels [B, T] long, attention_mask [B, T] bool."""
    B, T = len(seqs), max(len(ids) for ids, _ in seqs)
    batch = dict(input_ids=torch.full((B, T), pad_id, dtype=torch.long), labels=torch.full((B, T), -100, dtype=torch.long),
                 attention_mask=torch.zeros(B, T, dtype=torch.bool))
    for b, (ids, labels) in enumerate(seqs):
        batch["input_ids"][b, :len(ids)], batch["labels"][b, :len(ids)], batch["attention_mask"][b, :len(ids)] = ids, labels, True
    return batch


class T2IBatches:
    """Endless, resumable stream of one rank's training batches over a map-style dataset of (captions, codes)
    (a CodeDataset, or a plain list; captions is a str or a list of str, one drawn per use).

    Epoch e visits torch.randperm(n, seed + e) in global batches of batch_size * world_size; rank r takes the
    contiguous slice [r*b, (r+1)*b) of each, so 2 ranks x b see the samples of 1 rank x 2b, and the tail
    (n mod global batch) is dropped so every rank takes as many steps. A sample's dropout, prefix and caption
    draws come from a generator seeded with (seed, epoch, position in the epoch), never the rank: both runs
    build the very same sequences, and the whole stream state is (epoch, position), which state_dict holds.
    """

    def __init__(self, dataset, tokenizer, first_id, batch_size, *, seed=0, rank=0, world_size=1, p_drop_cond=0.1,
                 prefixes=STYLE_PREFIXES, text_loss=True, max_len=None, shuffle=True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
        self.dataset, self.tokenizer, self.first_id, self.batch_size = dataset, tokenizer, first_id, batch_size
        self.seed, self.rank, self.p_drop_cond, self.prefixes = seed, rank, p_drop_cond, list(prefixes)
        self.text_loss, self.max_len, self.shuffle, self.pad_id = text_loss, max_len, shuffle, pad_token_id(tokenizer)
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = len(dataset) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"dataset of {len(dataset)} samples is smaller than one global batch "
                             f"({batch_size} x {world_size} ranks)")
        self.epoch, self.position = 0, 0  # position: samples of this epoch's order consumed by all ranks together

    def order(self, epoch) -> torch.Tensor:
        n = len(self.dataset)
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)) if self.shuffle else torch.arange(n)

    def sequence(self, epoch, position, index):
        captions, codes = self.dataset[index]
        captions = [captions] if isinstance(captions, str) else captions
        u = np.random.default_rng([self.seed, epoch, position]).random(3)  # always 3 draws: each stays independent
        return make_sequence(self.tokenizer, captions[int(u[1] * len(captions))], codes, self.first_id,
                             self.prefixes[int(u[2] * len(self.prefixes))], bool(u[0] < self.p_drop_cond),
                             self.text_loss, self.max_len)

    def __iter__(self):
        while True:
            order = self.order(self.epoch)
            while self.position + self.global_batch <= self.steps_per_epoch * self.global_batch:
                start = self.position + self.rank * self.batch_size
                seqs = [self.sequence(self.epoch, p, int(order[p])) for p in range(start, start + self.batch_size)]
                self.position += self.global_batch  # before yielding: a state saved after this batch resumes at the next
                yield collate(seqs, self.pad_id)
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, position=self.position, seed=self.seed, n=len(self.dataset))

    def load_state_dict(self, state):
        if (state["seed"], state["n"]) != (self.seed, len(self.dataset)) or state["position"] % self.global_batch:
            raise ValueError(f"loader state {state} does not fit seed {self.seed}, {len(self.dataset)} samples "
                             f"and global batch {self.global_batch}")
        self.epoch, self.position = state["epoch"], state["position"]


# ----------------------------------------------------------------------------------------- code shards
class _Rows:
    """Rows of several (memory-mapped) shard arrays seen as one sequence."""

    def __init__(self, arrays):
        self.arrays, self.starts = arrays, np.cumsum([0] + [len(a) for a in arrays]).tolist()

    def __len__(self):
        return self.starts[-1]

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        k = bisect.bisect_right(self.starts, i) - 1  # the last shard starting at or before i (skips empty ones)
        return self.arrays[k][i - self.starts[k]]


def load_code_shards(root):
    """(codes: rows of [h, w] uint16/int32, memory-mapped; captions: list of caption lists) of a prepared directory."""
    if not os.path.isfile(os.path.join(root, "index.json")):
        raise FileNotFoundError(f"{root}: no index.json (run `python data.py prepare` until every shard is done)")
    index, codes, captions = _read_json(os.path.join(root, "index.json")), [], []
    for shard in index["shards"]:
        codes.append(np.load(os.path.join(root, shard["codes"]), mmap_mode="r"))
        captions += _read_json(os.path.join(root, shard["captions"]))
        if len(codes[-1]) != shard["count"]:
            raise ValueError(f"{root}/{shard['codes']}: {len(codes[-1])} rows, index.json says {shard['count']}")
    if len(captions) != index["count"]:
        raise ValueError(f"{root}: {len(captions)} captions, index.json says {index['count']}")
    return _Rows(codes), captions


class CodeDataset:
    """Map-style dataset over a prepare_codes directory: item i = (captions list, codes [h, w])."""

    def __init__(self, root):
        self.codes, self.captions = load_code_shards(root)
        self.index = _read_json(os.path.join(root, "index.json"))  # resolution, grid, codebook_size, ...

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return self.captions[i], self.codes[i]


def read_meta(meta_path) -> list:
    """Records of a JSON list or a JSONL file; an unparsable JSONL line becomes None (a bad record, skipped later)."""
    with open(meta_path, encoding="utf-8") as f:
        text = f.read()
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


def _load_record(rec, root, resolution, pil_to_tensor):
    """(skip reason or None, captions, image [3, R, R] in [-1, 1]) of one meta record."""
    image = rec.get("image", rec.get("image_path")) if isinstance(rec, dict) else None  # image_path: SimpleAR's metas
    if not isinstance(image, str) or "caption" not in rec:
        return "bad_record", None, None
    captions = [rec["caption"]] if isinstance(rec["caption"], str) else rec["caption"]
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        return "caption_not_text", None, None
    try:
        with Image.open(os.path.join(root, image)) as im:
            im = im.convert("RGB")  # decodes now, so a broken file fails inside this try
    except FileNotFoundError:
        return "missing_image", None, None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return "unreadable_image", None, None
    return None, [c.strip() for c in captions], pil_to_tensor(im, resolution)


def _write_atomic(path, obj):
    """Write under a temporary name, then rename: a file that exists is complete, which resuming relies on."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        if isinstance(obj, np.ndarray):
            np.save(f, obj)
        else:
            f.write(json.dumps(obj).encode())
    os.replace(tmp, path)


def _shard_names(k):
    return f"codes_{k:05d}.npy", f"captions_{k:05d}.json"


def prepare_codes(meta_path, out_dir, vq, resolution, shard_size=1024, batch_size=8, rank=0, world_size=1, device="cpu"):
    """Encode a meta file's images into code shards; returns this rank's report.

    meta: JSON list or JSONL of {"image": path (relative to the meta's folder or absolute), "caption": str or [str]}.
    Shard k holds records [k*shard_size, (k+1)*shard_size) minus the skipped ones, is encoded by rank
    k % world_size and written as codes_k.npy ([N, h, w], uint16 when the codebook fits, else int32) +
    captions_k.json (list of caption lists). Finished shards are kept, so a rerun redoes only missing ones.
    Bad records and unreadable images are skipped and counted by reason (report_rank{r}.json). The rank that
    finds every shard present writes index.json; rerunning prepare on a finished directory writes it if absent.
    vq: any object with .spatial_compression and .encode(images [B, 3, R, R] in [-1, 1]) -> [B, h, w], and
    .codebook_size (without it codes are stored as int32), e.g. a cosmos_tokenizer.CosmosTokenizer.
    """
    from cosmos_tokenizer import pil_to_tensor  # lazy: the rest of data.py needs no visual tokenizer

    f = vq.spatial_compression
    if resolution % f:
        raise ValueError(f"resolution {resolution} is not divisible by the visual tokenizer's spatial compression {f}")
    records, root, grid = read_meta(meta_path), os.path.dirname(os.path.abspath(meta_path)), [resolution // f] * 2
    codebook = getattr(vq, "codebook_size", 1 << 31)
    dtype = np.uint16 if codebook <= 1 << 16 else np.int32
    settings = dict(resolution=resolution, grid=grid, codebook_size=codebook, shard_size=shard_size, records=len(records))
    os.makedirs(out_dir, exist_ok=True)
    settings_path = os.path.join(out_dir, "prepare.json")
    if os.path.isfile(settings_path) and _read_json(settings_path) != settings:  # never mix shards of two setups
        raise ValueError(f"{out_dir} holds shards prepared with {_read_json(settings_path)}, not {settings}; use another --out")
    _write_atomic(settings_path, settings)
    n_shards = math.ceil(len(records) / shard_size)
    done = lambda k: all(os.path.isfile(os.path.join(out_dir, name)) for name in _shard_names(k))
    mine = [k for k in range(rank, n_shards, world_size) if not done(k)]
    report = dict(rank=rank, shards=mine, encoded=0, skipped={}, examples={})
    bar = tqdm(total=sum(len(records[k * shard_size:(k + 1) * shard_size]) for k in mine), desc=f"codes rank {rank}",
               disable=rank != 0)
    with ThreadPoolExecutor(4) as pool, torch.inference_mode():  # threads: PIL decodes with the GIL released
        for k in mine:
            codes, captions, start = [], [], k * shard_size
            for b in range(start, min(start + shard_size, len(records)), batch_size):
                chunk = records[b:min(b + batch_size, start + shard_size)]
                loaded = list(pool.map(lambda r: _load_record(r, root, resolution, pil_to_tensor), chunk))
                for i, (reason, _, _) in enumerate(loaded):
                    if reason:
                        report["skipped"][reason] = report["skipped"].get(reason, 0) + 1
                        examples = report["examples"].setdefault(reason, [])
                        if len(examples) < 5:  # record numbers (meta order) of the first few, to go and look
                            examples.append(b + i)
                images = [img for reason, _, img in loaded if reason is None]
                if images:
                    c = vq.encode(torch.stack(images).to(device))
                    if c.numel() != len(images) * grid[0] * grid[1]:
                        raise ValueError(f"the visual tokenizer returned codes of shape {tuple(c.shape)}, "
                                         f"expected [{len(images)}, {grid[0]}, {grid[1]}]")
                    codes.append(c.reshape(len(images), *grid).cpu().numpy())
                    captions += [caps for reason, caps, _ in loaded if reason is None]
                bar.update(len(chunk))
            codes = np.concatenate(codes) if codes else np.zeros((0, *grid), np.int64)
            if len(codes) and (codes.min() < 0 or codes.max() >= codebook):
                raise ValueError(f"the visual tokenizer returned codes outside [0, {codebook})")
            _write_atomic(os.path.join(out_dir, _shard_names(k)[1]), captions)  # captions first: codes present => done
            _write_atomic(os.path.join(out_dir, _shard_names(k)[0]), codes.astype(dtype))
            report["encoded"] += len(captions)
    bar.close()
    complete = all(done(k) for k in range(n_shards))
    if complete:
        shards = [dict(codes=c, captions=t, count=len(_read_json(os.path.join(out_dir, t))))
                  for c, t in map(_shard_names, range(n_shards))]
        _write_atomic(os.path.join(out_dir, "index.json"),
                      dict(settings, count=sum(s["count"] for s in shards), shards=shards))
    _write_atomic(os.path.join(out_dir, f"report_rank{rank}.json"), report)
    print(f"rank {rank}: encoded {report['encoded']} images into {len(mine)} shard(s), skipped {report['skipped']} "
          f"(record numbers: {report['examples']}); index.json {'written' if complete else 'waits for other ranks'}")
    return report


# ----------------------------------------------------------------------------------------- synthetic shapes
BACKGROUND = (245, 245, 245)
PALETTE = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 90, 220), "yellow": (240, 200, 40),
           "purple": (150, 70, 200), "orange": (245, 130, 30)}
SHAPES = ("circle", "square", "triangle")
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")  # GenEval's
RELATIONS = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (1, -1), "below": (1, 1)}  # axis, sign of a-b
INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}
NUMBERS = {2: "two", 3: "three", 4: "four"}
TEMPLATES = ("{}", "a picture of {}", "an image of {}", "{} on a white background", "a simple drawing of {}")
MIN_SIZE, MAX_SIZE, GAP = 0.2, 0.4, 0.03  # object side and the empty space around objects, as fractions of the image
# Object boxes on a lattice of 1/16 of the side (4 px at 64 px, half an 8x8-code cell): with edges anywhere, one code
# of 1,000 must tell a corner's or an arc's colour and its offset among 8x8 in its cell, which the nano tokenizer could
# not (28.5 dB, squares decoded with round corners); with two offsets per cell it can. 0: anywhere.
LATTICE = 16
# Hard pixel edges are aliasing: at 64 px they were 94% of an 8x8-code tokenizer's reconstruction error
SUPERSAMPLE = 4


def render_shapes(spec, size, supersample=SUPERSAMPLE) -> Image.Image:
    """Draw spec (dicts: shape, color, center [x, y] and size as fractions of the image side; y points down) at
    supersample x the size, then average each supersample x supersample block (a box filter): edge pixels get the
    share of each colour that covers them, as any rendered or photographed image does. supersample=1 draws hard
    edges, every pixel exactly the background or a palette colour."""
    if supersample > 1:
        return render_shapes(spec, size * supersample, 1).resize((size, size), Image.Resampling.BOX)
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in spec:
        (cx, cy), h = o["center"], o["size"] / 2
        x0, y0, x1, y1 = (round(v * size) for v in (cx - h, cy - h, cx + h, cy + h))
        box, fill = (x0, y0, x1 - 1, y1 - 1), PALETTE[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse(box, fill=fill)
        elif o["shape"] == "square":
            draw.rectangle(box, fill=fill)
        elif o["shape"] == "triangle":  # pointing up: apex at the top middle, base on the box's bottom
            draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
        else:
            raise ValueError(f"unknown shape {o['shape']!r}; expected one of {SHAPES}")
    return img


def centroid(o) -> np.ndarray:
    """Area centroid of an object: a triangle's lies size/6 below its box centre."""
    return np.add(o["center"], [0, o["size"] / 6 if o["shape"] == "triangle" else 0])


def relations(a, b) -> set:
    """GenEval's rule: the centroid offset a-b, shrunk by 0.1 x (sizes), must point within 60 degrees of a direction."""
    d = centroid(a) - centroid(b)
    r = np.maximum(np.abs(d) - 0.1 * (a["size"] + b["size"]), 0) * np.sign(d) / max(np.linalg.norm(d), 1e-9)
    return {rel for rel, (axis, sign) in RELATIONS.items() if sign * r[axis] > 0.5}


def _noun(shape, color, n=1):
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}" if n == 1 else f"{NUMBERS[n]} {color} {shape}s"


def sample_scene(rng, category, lattice=LATTICE):
    """(spec, canonical caption, captions) of one random scene; captions[0] is the canonical (evaluation) form.
    Object sides and box edges are multiples of 1/lattice of the image side (lattice 0: any value)."""
    pick = lambda seq, k: [seq[i] for i in rng.choice(len(seq), k, replace=False)]
    colors = list(PALETTE)
    if category in ("single_object", "colors"):
        objs = [(*pick(SHAPES, 1), *pick(colors, 1))]
    elif category == "counting":
        objs = [(*pick(SHAPES, 1), *pick(colors, 1))] * int(rng.integers(2, 5))
    elif category == "two_object":  # two kinds of object, colours free
        objs = list(zip(pick(SHAPES, 2), [pick(colors, 1)[0] for _ in range(2)]))
    elif category in ("color_attr", "position"):  # two kinds, two colours: the attribute binding is testable
        objs = list(zip(pick(SHAPES, 2), pick(colors, 2)))
    else:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    relation = list(RELATIONS)[rng.integers(4)] if category == "position" else None
    hi = MAX_SIZE if len(objs) <= 2 else 0.3  # up to four objects of 0.4 rarely fit: keep rejection sampling quick
    if lattice:  # the allowed sides: multiples of 1/lattice from MIN_SIZE up to the one nearest hi, within MAX_SIZE
        top = min(np.floor(MAX_SIZE * lattice), round(hi * lattice))
        sides = np.arange(np.ceil(MIN_SIZE * lattice), top + 1) / lattice
    while True:  # rejection sampling: objects inside the image, GAP apart, the relation unambiguous
        spec = []
        for (s, c), z in zip(objs, rng.uniform(MIN_SIZE, hi, len(objs))):
            if lattice:  # the nearest lattice side, then the box's top-left corner on a lattice point
                z = sides[np.abs(sides - z).argmin()]
                first, last = np.ceil(GAP * lattice), np.floor((1 - GAP - z) * lattice)
                center = rng.integers(first, last + 1, 2) / lattice + z / 2
            else:
                center = rng.uniform(z / 2 + GAP, 1 - z / 2 - GAP, 2)
            spec.append(dict(shape=s, color=c, center=center.tolist(), size=float(z)))
        apart = all(np.abs(np.subtract(a["center"], b["center"])).max() >= (a["size"] + b["size"]) / 2 + GAP
                    for i, a in enumerate(spec) for b in spec[i + 1:])
        if apart and (relation is None or relations(spec[0], spec[1]) == {relation}):
            break
    a, b = _noun(*objs[0]), _noun(*objs[-1])
    if category == "counting":
        variants = [_noun(*objs[0], n=len(objs)), f"{len(objs)} {objs[0][1]} {objs[0][0]}s"]
    elif relation:
        variants = [f"{a} {relation} {b}", f"{b} {INVERSE[relation]} {a}"]
    elif len(objs) == 2:
        variants = [f"{a} and {b}", f"{b} and {a}"]
    else:
        variants = [a]
    captions = list(dict.fromkeys(t.format(v) for t in TEMPLATES for v in variants))
    return spec, captions[0], captions


class ShapesDataset:
    """n scenes; item i is a pure function of (seed, i), and categories take turns: each is equally frequent, or
    as often as it is repeated in categories. lattice: as sample_scene's."""

    def __init__(self, n, size=256, seed=0, categories=CATEGORIES, lattice=LATTICE):
        unknown = sorted(set(categories) - set(CATEGORIES))
        if unknown or not categories:
            raise ValueError(f"categories {' '.join(unknown) or '(none)'}: expected some of {', '.join(CATEGORIES)}")
        if lattice < 0 or 0 < lattice < 8:
            raise ValueError(f"lattice {lattice}: 0 (anywhere) or at least 8 (a coarser one has no room for four objects)")
        self.n, self.size, self.seed, self.categories, self.lattice = n, size, seed, list(categories), lattice

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        category = self.categories[i % len(self.categories)]
        spec, canonical, captions = sample_scene(np.random.default_rng([self.seed, i]), category, self.lattice)
        return dict(image=render_shapes(spec, self.size), caption=canonical, captions=captions, category=category, spec=spec)


def train_bpe_tokenizer(texts, vocab_size, path) -> Tokenizer:
    """A Qwen2-style byte-level BPE trained on texts, plus <|endoftext|> and SPECIAL_TOKENS as added special tokens
    (after the vocabulary, like Qwen2.5), saved as path/tokenizer.json. vocab_size counts the 256 bytes and merges."""
    tok = _qwen2_tokenizer(models.BPE())
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([EOS_TOKEN, *SPECIAL_TOKENS])
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, f"tokenizer.json.tmp{os.getpid()}")
    tok.save(tmp)
    os.replace(tmp, os.path.join(path, "tokenizer.json"))
    return tok


# ----------------------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every CLI error of the project
        print(f"data.py: {message}", file=sys.stderr)
        raise SystemExit(2)


def _cli_prepare(args):
    if not os.path.isfile(args.meta):
        raise FileNotFoundError(f"meta file {args.meta} not found")
    from cosmos_tokenizer import CosmosTokenizer

    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    vq = CosmosTokenizer.from_pretrained(args.vq, device=device)
    prepare_codes(args.meta, args.out, vq, args.resolution, args.shard_size, args.batch_size,
                  int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), device)


def _cli_shapes(args):
    if args.n <= 0 or args.size <= 0:
        raise ValueError(f"--n {args.n} and --size {args.size} must be positive")
    ds = ShapesDataset(args.n, args.size, args.seed, args.categories, args.lattice)
    texts = [*STYLE_PREFIXES, NEGATIVE_PROMPT]
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    meta = os.path.join(args.out, "meta.jsonl")
    with open(meta + ".tmp", "w") as f:
        for i in tqdm(range(len(ds)), desc="shapes"):
            item, name = ds[i], f"images/{i:06d}.png"
            item["image"].save(os.path.join(args.out, name))
            f.write(json.dumps(dict(image=name, caption=item["captions"], canonical=item["caption"],
                                    category=item["category"], spec=item["spec"])) + "\n")
            texts += item["captions"]
    os.replace(meta + ".tmp", meta)
    train_bpe_tokenizer(texts, args.vocab_size, os.path.join(args.out, "tokenizer"))
    print(f"wrote {args.n} images, {meta} and {os.path.join(args.out, 'tokenizer', 'tokenizer.json')}")


def main(argv=None):
    p = _Parser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("prepare", help="encode a meta file's images into code shards")
    q.add_argument("--meta", required=True, help="JSON list or JSONL of {image, caption}")
    q.add_argument("--vq", required=True, help="visual tokenizer checkpoint directory")
    q.add_argument("--resolution", type=int, required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--shard-size", type=int, default=1024)
    q.add_argument("--batch-size", type=int, default=8)
    s = sub.add_parser("shapes", help="render the synthetic shapes dataset and train its text tokenizer")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=10000)
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--vocab-size", type=int, default=1024)
    s.add_argument("--categories", nargs="+", default=list(CATEGORIES), metavar="CATEGORY",
                   help=f"scene i is of category i mod their number; repeat one to weight it (of {', '.join(CATEGORIES)})")
    s.add_argument("--lattice", type=int, default=LATTICE,
                   help="object sides and box edges are multiples of 1/LATTICE of the side; 0: anywhere")
    args = p.parse_args(argv)
    try:
        _cli_prepare(args) if args.cmd == "prepare" else _cli_shapes(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"data.py {args.cmd}: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
