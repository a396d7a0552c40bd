"""model.py against transformers' Qwen2 (the reference), and the cached paths against the uncached
one."""
import json
import os

import pytest
import torch

from model import (Int8Linear, ModelArgs, Transformer, onednn_bf16_packing, pack_weights,
                   read_safetensors, resolve_dtype)

transformers = pytest.importorskip("transformers")

# SimpleAR-like vocabulary: 300 text ids + 7 special + 4,096 image codes
VOCAB = 300 + 7 + 4096
FIRST_IMAGE = 307


def hf_config(tie=True, **kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=96, rope_theta=1e6, rms_norm_eps=1e-6,
               max_position_embeddings=512, tie_word_embeddings=tie, hidden_act="silu")
    cfg.update(kw)
    return transformers.Qwen2Config(**cfg)


def random_hf(tie=True, seed=0, **kw):
    torch.manual_seed(seed)
    ref = transformers.Qwen2ForCausalLM(hf_config(tie, **kw)).float().eval()
    with torch.no_grad():  # biases are zero at init: make them count
        for n, p in ref.named_parameters():
            if "bias" in n or "norm" in n:
                p.normal_(0.0 if "bias" in n else 1.0, 0.1)
    return ref


def save_hf(ref, path, **kw):
    ref.save_pretrained(path, **kw)
    return str(path)


@pytest.mark.parametrize("tie,heads,kv", [(True, 4, 2), (False, 4, 2), (True, 4, 4), (False, 8, 1)])
def test_parity_with_transformers(tmp_path, tie, heads, kv):
    ref = random_hf(tie, num_attention_heads=heads, num_key_value_heads=kv)
    model = Transformer.from_pretrained(save_hf(ref, tmp_path))
    assert (model.lm_head is None) == tie
    tokens = torch.randint(0, VOCAB, (3, 37))
    with torch.no_grad():
        want = ref(tokens).logits.float()
        got = model(tokens)
    assert got.dtype == torch.float32 and got.shape == (3, 37, VOCAB)
    assert (got - want).abs().max() < 1e-4


def test_head_and_legacy_keys_load_as_transformers_loads_them(tmp_path):
    """A tied config whose file holds a different lm_head.weight (transformers >= 5 then keeps that
    head), the same head (tied), and the rotary_emb.inv_freq buffers older transformers saved
    (skipped)."""
    from safetensors.torch import save_file
    ref = random_hf(True)
    d = save_hf(ref, tmp_path / "base")
    tensors = read_safetensors(d)
    tokens = torch.randint(0, VOCAB, (2, 11))
    for name, head in (("own_head", torch.randn(VOCAB, 64) * 0.05),
                       ("same_head", tensors["model.embed_tokens.weight"].clone())):
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
        extra = {"lm_head.weight": head,
                 "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
                 "model.rotary_emb.inv_freq": torch.ones(8)}
        save_file({**tensors, **extra}, path / "model.safetensors", metadata={"format": "pt"})
        ours = Transformer.from_pretrained(path)
        assert (ours.lm_head is None) == (name == "same_head")
        with torch.no_grad():
            want = transformers.Qwen2ForCausalLM.from_pretrained(path).eval()(tokens).logits
            assert (ours(tokens) - want).abs().max() < 1e-4


def test_bf16_and_sharded_checkpoint_loads(tmp_path):
    ref = random_hf(False)
    ref.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="100KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    model = Transformer.from_pretrained(tmp_path)
    assert model.embed_tokens.weight.dtype == torch.float32
    tokens = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        want = ref.float()(tokens).logits
    assert (model(tokens) - want).abs().max() < 1e-4


def test_save_then_transformers_loads_same_logits(tmp_path):
    torch.manual_seed(1)
    for tie in (True, False):
        model = Transformer(ModelArgs(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                      intermediate_size=96, tie_word_embeddings=tie)).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "bias" in n:
                    p.normal_(0, 0.1)
        d = tmp_path / f"tie{tie}"
        model.save_pretrained(d)
        ref = transformers.Qwen2ForCausalLM.from_pretrained(d).eval()
        tokens = torch.randint(0, VOCAB, (2, 21))
        with torch.no_grad():
            assert (model(tokens) - ref(tokens).logits).abs().max() < 1e-4
        again = Transformer.from_pretrained(d)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                     again.state_dict().values()))


def test_from_hf_config_and_presets():
    a = ModelArgs.from_hf_config(hf_config().to_dict())
    assert ((a.vocab_size, a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.rope_theta)
            == (VOCAB, 64, 2, 4, 2, 16, 1e6))
    for name, total in (("simplear-0.5b", 551.1e6), ("simplear-1.5b", 1641.6e6)):
        with torch.device("meta"):
            m = Transformer(ModelArgs.from_name(name))
        assert m.args.vocab_size == 215672
        # Qwen2.5-0.5B / 1.5B (494.0M / 1543.7M parameters) plus the 215,672 - 151,936 vocabulary
        # rows SimpleAR adds; the head is tied
        assert abs(m.num_params() - total) < 0.1e6
    with pytest.raises(ValueError, match="unknown model config"):
        ModelArgs.from_name("nope")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = Transformer(ModelArgs.from_name("tiny")).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "bias" in n:
                p.normal_(0, 0.1)
    return m


@torch.no_grad()
def test_prefill_and_decode_equal_uncached(tiny):
    prompts = [[5, 9, 100, 7, 3], [8, 1, 2], [4, 4, 4, 4, 4, 4, 4]]
    gen = torch.randint(0, tiny.args.vocab_size, (3, 6))
    tiny.setup_cache(3, 64)
    last, ends = tiny.prefill(prompts)
    assert ends.tolist() == [5, 3, 7]
    for b, p in enumerate(prompts):  # each row alone, uncached, no padding
        alone = tiny(torch.tensor([p]))
        assert (last[b] - alone[0, -1]).abs().max() < 1e-4
    for t in range(gen.shape[1]):
        step = tiny(gen[:, t:t + 1], input_pos=ends[:, None] + t)
        for b, p in enumerate(prompts):
            full = tiny(torch.tensor([p + gen[b, :t + 1].tolist()]))
            assert (step[b, 0] - full[0, -1]).abs().max() < 1e-4


def test_prefill_under_autograd_is_refused(tiny):
    tiny.setup_cache(1, 64)
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        tiny.prefill([[1, 2, 3]])


@torch.no_grad()
def test_window_decode_and_rollback(tiny):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    tiny.setup_cache(1, 64)
    _, ends = tiny.prefill([prompt])
    col = int(ends[0])
    draft = torch.randint(0, tiny.args.vocab_size, (1, 5))
    win = tiny(draft, input_pos=torch.arange(col, col + 5), kv_len=col + 5)
    full = tiny(torch.tensor([prompt + draft[0].tolist()]))
    assert (win - full[:, -5:]).abs().max() < 1e-4
    # keep 2 of the 5 drafts, write 4 different tokens over the rest: no copy, just earlier columns
    new = torch.randint(0, tiny.args.vocab_size, (1, 4))
    win2 = tiny(new, input_pos=torch.arange(col + 2, col + 6))
    full2 = tiny(torch.tensor([prompt + draft[0, :2].tolist() + new[0].tolist()]))
    assert (win2 - full2[:, -4:]).abs().max() < 1e-4


@torch.no_grad()
def test_copy_rows_and_vocab_slice(tiny):
    tiny.setup_cache(6, 32)
    cond, uncond = [7, 8, 9, 10], [11, 12]
    _, ends = tiny.prefill([cond, uncond])
    tiny.cache.copy_rows([0, 0, 1, 1], [2, 4, 3, 5])  # rows 0,2,4 = cond; 1,3,5 = uncond
    col = ends[[0, 1, 0, 1, 0, 1]][:, None]
    nxt = torch.randint(0, tiny.args.vocab_size, (6, 1))
    lo, hi = FIRST_IMAGE, tiny.args.vocab_size
    sliced = tiny(nxt, input_pos=col, vocab=(lo, hi))
    assert sliced.shape == (6, 1, hi - lo)
    for b in range(6):
        p = cond if b % 2 == 0 else uncond
        full = tiny(torch.tensor([p + [nxt[b, 0].item()]]))
        assert (sliced[b, 0] - full[0, -1, lo:hi]).abs().max() < 1e-4


@torch.no_grad()
def test_per_row_positions_windows_and_rollback(tiny):
    """Rows of one batch advance by different amounts: input_pos [B, T] puts row b's tokens at its
    own columns. Every step is checked against an uncached forward of that row's whole sequence."""
    torch.manual_seed(3)
    V = tiny.args.vocab_size
    prompts = [[5, 9, 100, 7, 3], [8, 1, 2], [4, 4, 4, 4, 4, 4, 4]]
    seqs = [list(p) for p in prompts]  # what each row holds, as an uncached reference sees it
    tiny.setup_cache(3, 64)
    _, ends = tiny.prefill(prompts)
    ends = ends.tolist()  # the next free column of each row
    # windows of 4; row b keeps keep[b] of them (0 = all rolled back) and writes the next window
    # over the rest, at earlier columns
    for keep in ([4, 1, 0], [2, 4, 3], [0, 0, 4], [3, 2, 1]):
        window = torch.randint(0, V, (3, 4))
        pos = torch.tensor([[e + j for j in range(4)] for e in ends])
        out = tiny(window, input_pos=pos, kv_len=max(ends) + 4)
        for b in range(3):
            full = tiny(torch.tensor([seqs[b] + window[b].tolist()]))
            assert (out[b] - full[0, -4:]).abs().max() < 1e-4
            seqs[b] += window[b, :keep[b]].tolist()
            ends[b] += keep[b]
    # one-token steps at per-row columns, whole cache attended (kv_len None: the compiled shape)
    for _ in range(2):
        tok = torch.randint(0, V, (3, 1))
        out = tiny(tok, input_pos=torch.tensor(ends)[:, None])
        for b in range(3):
            full = tiny(torch.tensor([seqs[b] + tok[b].tolist()]))
            assert (out[b, 0] - full[0, -1]).abs().max() < 1e-4
            seqs[b] += tok[b].tolist()
            ends[b] += 1


@torch.no_grad()
def test_token_tree_then_moved_path_equal_uncached(tiny):
    """A tree of continuations in one forward (tree=): each token's logits are those of the
    uncached forward of its row's prefix and its own path; once a path per row is moved to the
    columns of its positions (cache.move), decoding goes on as if only that path had been run."""
    torch.manual_seed(4)
    V = tiny.args.vocab_size
    # root 0; children 1, 2, 3; 4 and 5 under 1, 6 under 2; a chain 7, 8 under 4
    parent = [-1, 0, 0, 0, 1, 1, 2, 4, 7]
    T = len(parent)
    tree = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        a = t
        while a >= 0:
            tree[t, a], a = True, parent[a]
    prompts = [[5, 9, 100, 7, 3], [8, 1, 2]]
    tiny.setup_cache(2, 64)
    _, ends = tiny.prefill(prompts)
    nodes = torch.randint(0, V, (2, T))
    cols = ends[:, None] + torch.arange(T)
    out = tiny(nodes, input_pos=cols, kv_len=int(ends.max()) + T, tree=tree)
    paths = []
    for t in range(T):
        path = tree[t].nonzero()[:, 0].tolist()  # ancestors, root first
        paths.append(path)
        for b, p in enumerate(prompts):
            full = tiny(torch.tensor([p + nodes[b, path].tolist()]))
            assert (out[b, t] - full[0, -1]).abs().max() < 1e-4
    chosen = [paths[8], paths[6]]  # row 0 keeps 0-1-4-7-8, row 1 keeps 0-2-6
    P = max(len(c) for c in chosen)
    pad = [list(range(len(c), P)) for c in chosen]  # columns past a path: moved onto themselves
    src = torch.tensor([c + x for c, x in zip(chosen, pad)])
    dst = torch.tensor([list(range(len(c))) + x for c, x in zip(chosen, pad)])
    tiny.cache.move(ends[:, None] + src, ends[:, None] + dst)
    tok = torch.randint(0, V, (2, 1))
    at = ends + torch.tensor([len(c) for c in chosen])
    step = tiny(tok, input_pos=at[:, None])
    for b, p in enumerate(prompts):
        full = tiny(torch.tensor([p + nodes[b, chosen[b]].tolist() + tok[b].tolist()]))
        assert (step[b, 0] - full[0, -1]).abs().max() < 1e-4
    chain = torch.ones(T, T, dtype=torch.bool).tril()  # the plain window, as a tree
    assert torch.equal(tiny(nodes, input_pos=cols, tree=chain), tiny(nodes, input_pos=cols))
    with pytest.raises(ValueError, match="give input_pos"):
        tiny(nodes, tree=chain)


@torch.no_grad()
def test_compiled_decode_does_not_recompile(tiny):
    torch._dynamo.reset()
    tiny.setup_cache(2, 32)
    _, ends = tiny.prefill([[1, 2, 3], [4, 5]])
    step = torch.compile(tiny, dynamic=False)
    eager_logits = []
    tok = torch.tensor([[9], [9]])
    counter = torch._dynamo.utils.counters
    counter.clear()
    for t in range(4):
        out = step(tok, input_pos=ends[:, None] + t, vocab=(FIRST_IMAGE, tiny.args.vocab_size))
        eager_logits.append(out)
    frames = counter["stats"]["unique_graphs"]
    assert frames == 1, f"compiled {frames} graphs for 4 decode steps"
    # same as eager
    tiny.setup_cache(2, 32)
    tiny.prefill([[1, 2, 3], [4, 5]])
    for t in range(4):
        out = tiny(tok, input_pos=ends[:, None] + t, vocab=(FIRST_IMAGE, tiny.args.vocab_size))
        assert (out - eager_logits[t]).abs().max() < 1e-4


def test_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Transformer.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(tmp_path)
    ref = random_hf(False)
    d = save_hf(ref, tmp_path / "ok")
    # not a Qwen2 config
    bad = tmp_path / "llama"
    bad.mkdir()
    cfg = json.load(open(os.path.join(d, "config.json")))
    json.dump({**cfg, "model_type": "llama"}, open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match="'llama'"):
        Transformer.from_pretrained(bad)
    # no weights
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Transformer.from_pretrained(_cfg_only(tmp_path / "noweights", cfg))
    # truncated file
    trunc = _cfg_only(tmp_path / "trunc", cfg)
    data = open(os.path.join(d, "model.safetensors"), "rb").read()
    open(trunc / "model.safetensors", "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Transformer.from_pretrained(trunc)
    # wrong shape: the file has intermediate size 96, the config says 128
    shaped = _cfg_only(tmp_path / "shape", {**cfg, "intermediate_size": 128})
    open(shaped / "model.safetensors", "wb").write(data)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight has shape "
                       r"\(96, 64\), expected \(128, 64\)"):
        Transformer.from_pretrained(shaped)
    # missing and unexpected keys
    from safetensors.torch import save_file
    t = read_safetensors(d)
    miss = _cfg_only(tmp_path / "miss", cfg)
    save_file({k: v for k, v in t.items() if k != "model.norm.weight"}, miss / "model.safetensors")
    with pytest.raises(ValueError,
                       match=r"missing key model.norm.weight \(expected shape \(64,\)\)"):
        Transformer.from_pretrained(miss)
    extra = _cfg_only(tmp_path / "extra", cfg)
    save_file({**t, "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)},
              extra / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected key model.layers.0.self_attn.o_proj.bias"):
        Transformer.from_pretrained(extra)
    # missing shard named by the index
    sharded = tmp_path / "sharded"
    ref.save_pretrained(sharded, max_shard_size="100KB")
    shard = sorted(p for p in os.listdir(sharded) if p.endswith(".safetensors"))[0]
    os.remove(sharded / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        Transformer.from_pretrained(sharded)


def _cfg_only(d, cfg):
    d.mkdir()
    json.dump(cfg, open(d / "config.json", "w"))
    return d


def test_dtype_choice_follows_the_hardware(monkeypatch):
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr("model.cpu_bf16_native", lambda: native)
        assert resolve_dtype("auto", "cpu") == (want, None)
        assert resolve_dtype("float32", "cpu") == (torch.float32, None)
        dtype, warning = resolve_dtype("bfloat16", "cpu")
        assert dtype == torch.bfloat16 and (warning is None) == native
        assert warning is None or "\n" not in warning
    with pytest.raises(ValueError, match="dtype must be auto or one of"):
        resolve_dtype("float8", "cpu")


@torch.no_grad()
def test_linear_decode_rows_match_f_linear_with_either_kernel(monkeypatch):
    """model.linear's float32 decode-row path (W @ x.T, on CPUs where ROWS_FIRST says it is
    faster) is that kernel, and agrees with F.linear, with and without bias, at every row count;
    without it, linear is F.linear exactly."""
    import torch.nn.functional as F

    import model
    assert model.ROWS_FIRST == (model.cpu_vendor() == "AuthenticAMD")
    w, b = torch.randn(300, 64), torch.randn(300)
    for rows_first in (True, False):
        monkeypatch.setattr(model, "ROWS_FIRST", rows_first)
        for rows in (1, 2, 8, 9):
            x = torch.randn(1, rows, 64)
            for bias in (None, b):
                got = model.linear(x, w, bias)
                want = F.linear(x, w, bias)
                assert got.shape == (1, rows, 300)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                if rows_first and rows <= 8:
                    direct = (w @ x[0].t()).t() + (0 if bias is None else bias)
                    assert torch.equal(got[0], direct)
                else:
                    assert torch.equal(got, want)


@torch.no_grad()
def test_prepared_decoding_kernels_match_the_plain_path(tiny):
    """prepare_decoding's packed bf16 weights (on CPU) give the plain bf16 logits; int8 weights stay
    close to the float ones and pick the same greedy code for nearly every row. Gradients never see
    either."""
    lo, hi = FIRST_IMAGE, tiny.args.vocab_size
    tokens = torch.randint(0, lo, (4, 9))
    want = tiny(tokens, vocab=(lo, hi))
    bf16 = Transformer(tiny.args).eval()
    bf16.load_state_dict(tiny.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    plain = bf16(tokens, vocab=(lo, hi))
    keys = bf16.state_dict().keys()
    packed = bf16.prepare_decoding((lo, hi))(tokens, vocab=(lo, hi))
    # packed where oneDNN can pack bf16 (AVX512 or AVX-NE-CONVERT); F.linear elsewhere
    assert (bf16.layers[0].mlp.down_proj.packed is not None) == onednn_bf16_packing()
    # ... and q, k, v (gate, up) then run as one packed matmul, whose parts keep no packed copy
    for block in bf16.layers:
        for fused, part in ((block.self_attn.fused, block.self_attn.k_proj),
                            (block.mlp.fused, block.mlp.up_proj)):
            assert (fused is not None) == onednn_bf16_packing() and part.packed is None
    assert bf16.state_dict().keys() == keys
    pack_weights(bf16)  # one packed matmul per part again, and no stale fused copy
    assert bf16.layers[0].mlp.fused is None
    unfused = bf16(tokens, vocab=(lo, hi))
    assert (unfused - packed).abs().max() <= 1e-2 * packed.abs().max()  # bitwise, where tried
    assert (packed - plain).abs().max() <= 0.02 * plain.abs().max()
    assert (packed - want).abs().max() <= 0.05 * want.abs().max()
    assert sum(p.numel() for p in bf16.parameters()) == sum(p.numel() for p in tiny.parameters())
    q = Transformer(tiny.args).eval()
    q.load_state_dict(tiny.state_dict())
    q.prepare_decoding((lo, hi), quantize="int8")
    assert isinstance(q.layers[0].mlp.up_proj, Int8Linear)
    got = q(tokens, vocab=(lo, hi))
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    # bf16 activations on a CPU take PyTorch's int8 kernel (torch._weight_int8pack_mm), not the
    # dequantization
    q16 = Transformer(tiny.args).eval()
    q16.load_state_dict(tiny.state_dict())
    q16 = q16.to(torch.bfloat16).prepare_decoding((lo, hi), quantize="int8")
    got16 = q16(tokens, vocab=(lo, hi))
    assert (got16 - want).abs().max() <= 0.08 * want.abs().max()
    assert (got16.argmax(-1) == want.argmax(-1)).float().mean() >= 0.85
    with torch.enable_grad():  # the head under autograd is the embedding's own rows
        tiny.prepare_decoding((lo, hi))
        tiny(tokens[:1], vocab=(lo, hi)).sum().backward()
        assert tiny.embed_tokens.weight.grad[lo:hi].abs().sum() > 0
        tiny.zero_grad(set_to_none=True)
        tiny.decode_head = None
