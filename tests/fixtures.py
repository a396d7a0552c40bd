"""Tiny checkpoints in the real on-disk formats, for tests that run the whole text-to-image path.

    from fixtures import write_tiny_lm, write_tiny_vq
    lm_dir = write_tiny_lm(tmp / "lm", codebook_size=64)  # config.json, model.safetensors,
                                                          # tokenizer.json, ...
    vq_dir = write_tiny_vq(tmp / "vq", levels=(4, 4, 4))  # encoder.jit + decoder.jit (bf16)
                                                          # + config.json

Both are random: they check plumbing and formats, not image quality.
"""
import json
import os
import warnings
from collections import OrderedDict

import torch
import torch.nn as nn

from cosmos_tokenizer import CosmosConfig, CosmosTokenizer
from data import NEGATIVE_PROMPT, STYLE_PREFIXES, train_bpe_tokenizer
from model import ModelArgs, Transformer

TEXTS = [*STYLE_PREFIXES, NEGATIVE_PROMPT, "a cat wearing a hat",
         "a red circle to the left of a blue square", "two dogs playing in the snow"]


def write_tiny_lm(path, codebook_size=64, text_vocab=300, seed=0, repetition_penalty=1.1,
                  room=0):
    """A Qwen2 checkpoint directory whose vocabulary is the tokenizer's plus codebook_size image
    rows (room < 0 makes it too small for the codebook). repetition_penalty None: no
    generation_config.json."""
    path = str(path)
    # byte-level BPE + <|endoftext|> + SimpleAR's 7 tokens
    tok = train_bpe_tokenizer(TEXTS, text_vocab, path)
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(vocab_size=tok.get_vocab_size() + codebook_size + room, dim=32,
                                  n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64,
                                  bos_token_id=None, eos_token_id=None))
    with torch.no_grad():  # biases start at zero: make them count
        for n, p in model.named_parameters():
            if "bias" in n:
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    if repetition_penalty is not None:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump({"repetition_penalty": repetition_penalty, "do_sample": True}, f)
    return path


def tiny_vq_config(levels=(4, 4, 4)):
    return CosmosConfig(channels=8, num_res_blocks=1, levels=list(levels),
                        embedding_dim=len(levels))


def write_tiny_vq(path, levels=(4, 4, 4), seed=0, jit=True):
    """A Cosmos tokenizer directory: NVIDIA's layout (encoder.jit / decoder.jit traced in bf16, plus
    our config.json, since a .jit directory's config otherwise defaults to DV8x16x16), or ours
    (jit=False)."""
    torch.manual_seed(seed)
    vq = CosmosTokenizer(tiny_vq_config(levels)).eval()
    if not jit:
        vq.save_pretrained(path)
        return str(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "cosmos_tokenizer", **vq.config.to_dict()}, f)
    vq = vq.to(torch.bfloat16)
    # the prefixes of NVIDIA's encoder_jit()/decoder_jit() Sequentials (NVIDIA/Cosmos-Tokenizer,
    # cosmos_tokenizer/networks/discrete_video.py)
    enc = nn.Sequential(OrderedDict(encoder=vq.encoder, quant_conv=vq.quant_conv))
    dec = nn.Sequential(OrderedDict(post_quant_conv=vq.post_quant_conv, decoder=vq.decoder))
    with torch.no_grad(), warnings.catch_warnings():
        # shape tests that are constant for one frame
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        for name, module, x in (("encoder", enc, torch.zeros(1, 3, 1, 32, 32)),
                                ("decoder", dec, torch.zeros(1, len(levels), 1, 2, 2))):
            # the check costs seconds
            traced = torch.jit.trace(module, x.to(torch.bfloat16), check_trace=False)
            traced.save(os.path.join(path, f"{name}.jit"))
    return str(path)
