"""
Tests for cosmos_tokenizer.py (CPU, small presets; the full-size DV8x16x16 is only built on the meta
device).

    python -m pytest -q tests/test_cosmos_tokenizer.py
"""

import copy
import hashlib
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from cosmos_tokenizer import (JIT_BUFFERS, CausalConv3d, CosmosConfig, CosmosTokenizer, FSQuantizer,
                              as_indices, center_crop, haar_patch, haar_unpatch, main,
                              pil_to_tensor, psnr, tensor_to_pil, tensor_to_uint8)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
# Optional: every key and shape of NVIDIA's module tree, where a shared/ folder lies beside the
# checkout; RELEASE_DIGESTS below holds the same in the repository.
KEYS_TSV = Path(__file__).resolve().parents[2] / "shared" / "reference"
KEYS_TSV = KEYS_TSV / "cosmos_dv8x16x16_keys.tsv"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return CosmosTokenizer(CosmosConfig.from_name("dv-tiny")).eval()


def rand_images(b, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


# --- FSQ ------------------------------------------------------------------------------------------


def test_fsq_every_index_round_trips_through_its_code():
    q = FSQuantizer([8, 8, 8, 5, 5, 5])
    assert q.codebook_size == 64000
    idx = torch.arange(64000)[None]  # [1, N]
    codes = q.indices_to_codes(idx)  # [1, 6, N]
    assert codes.shape == (1, 6, 64000)
    assert torch.equal(q.codes_to_indices(codes), idx)
    for d, L in enumerate(q.levels):
        expected = torch.tensor([(k - L // 2) / (L // 2) for k in range(L)])
        assert torch.equal(codes[0, d].unique(), expected)
    # channel 0 is the least significant digit
    assert codes[0, :, 0].tolist() == [-1] * 6
    assert codes[0, :, 1].tolist() == [-0.75] + [-1] * 5
    assert codes[0, :, 8].tolist() == [-1, -0.75] + [-1] * 4
    assert codes[0, :, 63999].tolist() == [0.75, 0.75, 0.75, 1, 1, 1]
    # the bounded quantizer maps a latent placed on each grid point back to that point
    L = torch.tensor(q.levels, dtype=torch.float64)[None, :, None]
    half_l, offset = (L - 1) * 1.001 / 2, (L % 2 == 0) * 0.5
    z = torch.atanh((codes.double() * (L // 2) + offset) / half_l) - torch.atanh(offset / half_l)
    out, out_idx = q(z.float())
    assert torch.equal(out, codes) and torch.equal(out_idx, idx)


def test_fsq_quantizes_any_latent_to_a_valid_code():
    q = FSQuantizer([8, 8, 8, 5, 5, 5])
    z = torch.randn(2, 6, 1, 4, 4) * 3
    codes, idx = q(z)
    assert idx.shape == (2, 1, 4, 4) and idx.dtype == torch.long
    assert 0 <= idx.min() and idx.max() < 64000
    assert torch.equal(q.indices_to_codes(idx), codes)


# --- Haar patcher ---------------------------------------------------------------------------------


def wavelet_reference(x):
    """Two levels of the 3D Haar DWT written as NVIDIA defines it (modules/patching.py of
    NVIDIA/Cosmos-Tokenizer): 1/sqrt(2) low/high filters per axis (t, h, w), bands concatenated
    lll..hhh, each level rescaled by 1/(2 sqrt 2); the first frame is repeated 4 times first."""
    def split(v, dim):
        a, b = v.unfold(dim, 2, 2).unbind(-1)
        return (a + b) / math.sqrt(2), (a - b) / math.sqrt(2)

    def level(v):
        bands = [w for t in split(v, 2) for h in split(t, 3) for w in split(h, 4)]
        return torch.cat(bands, 1) / (2 * math.sqrt(2))

    return level(level(torch.cat([x[:, :, :1].repeat(1, 1, 3, 1, 1), x], 2)))


def test_haar_patch_matches_wavelet_definition_and_inverts_exactly():
    x = torch.randn(2, 3, 9, 16, 24, dtype=torch.float64)
    p = haar_patch(x, 4)
    assert p.shape == (2, 192, 3, 4, 6)
    torch.testing.assert_close(p, wavelet_reference(x), rtol=0, atol=1e-12)
    # dyadic inputs make every sum exact, so the inverse must be bit-exact
    x = torch.randint(-128, 128, (1, 3, 17, 32, 16)).float() / 8
    assert torch.equal(haar_unpatch(haar_patch(x, 4), 4), x)
    img = torch.randint(-128, 128, (1, 3, 1, 16, 16)).float() / 8
    assert haar_patch(img, 4).shape == (1, 192, 1, 4, 4)
    assert torch.equal(haar_unpatch(haar_patch(img, 4), 4), img)


def test_single_frame_conv_shortcut_equals_padded_conv():
    torch.manual_seed(0)
    conv = CausalConv3d(4, 5, (3, 1, 1))
    x = torch.randn(2, 4, 1, 6, 6)
    padded = x.repeat(1, 1, 3, 1, 1)  # causal pad: two copies of the first frame
    expected = F.conv3d(padded, conv.conv3d.weight, conv.conv3d.bias)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


# --- shapes and causality -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [512, 1024])
def test_image_grid_sizes(tiny, size):
    x = rand_images(1, size)
    idx = tiny.encode(x)
    assert idx.shape == (1, size // 16, size // 16) and idx.dtype == torch.long
    assert 0 <= idx.min() and idx.max() < tiny.codebook_size == 64000
    rec = tiny.decode(idx)
    assert rec.shape == x.shape and rec.dtype == torch.float32


def test_video_shapes_and_causality(tiny):
    video = torch.rand(1, 3, 17, 64, 64) * 2 - 1
    idx = tiny.encode_video(video)
    assert idx.shape == (1, 3, 4, 4)
    assert tiny.decode_video(idx).shape == (1, 3, 17, 64, 64)
    # causal: the first latent frame sees only the first frame, the first output frame only the
    # first latent frame
    with torch.inference_mode():
        z_video = tiny.quant_conv(tiny.encoder(video))
        z_image = tiny.quant_conv(tiny.encoder(video[:, :, :1]))
    torch.testing.assert_close(z_video[:, :, :1], z_image, rtol=1e-4, atol=1e-4)
    first = tiny.decode_video(idx)[:, :, 0]
    torch.testing.assert_close(first, tiny.decode(idx[:, 0]), rtol=1e-4, atol=1e-4)


def test_other_compressions_keep_their_shapes():
    for kw, frames, latent in [({"temporal_compression": 4}, 9, (3, 4, 4)),
                               ({"spatial_compression": 8}, 9, (2, 8, 8)),
                               ({"spatial_compression": 8, "legacy_mode": True}, 17, (3, 8, 8))]:
        tok = CosmosTokenizer(CosmosConfig(channels=4, num_res_blocks=1, **kw)).eval()
        idx = tok.encode_video(torch.zeros(1, 3, frames, 64, 64))
        assert idx.shape == (1, *latent), kw
        assert tok.decode_video(idx).shape == (1, 3, frames, 64, 64), kw


# --- the released DV8x16x16 layout ----------------------------------------------------------------


# Digest of the sorted "key<TAB>AxBxC" lines of cosmos_dv8x16x16_keys.tsv per file, buffers left
# out, so that the test also runs where shared/ is absent; with the .tsv present the comparison is
# key by key.
RELEASE_DIGESTS = {"encoder.jit": (142, "fff577c026501ff4"),
                   "decoder.jit": (176, "e4565f230e4bff3d"),
                   "autoencoder.jit": (318, "30369399cd072fef")}


def release_keys(file):
    keys = {}
    for line in KEYS_TSV.read_text().splitlines():
        if line and not line.startswith("#") and line.startswith(file + "\t"):
            _, key, shape = line.split("\t")
            if key.rsplit(".", 1)[-1] not in JIT_BUFFERS:
                keys[key] = tuple(int(s) for s in shape.split("x"))
    return keys


@pytest.mark.parametrize("file,encoder,decoder", [("encoder.jit", True, False),
                                                  ("decoder.jit", False, True),
                                                  ("autoencoder.jit", True, True)])
def test_dv8x16x16_tree_has_exactly_the_release_keys(file, encoder, decoder):
    config = CosmosConfig.from_name("dv8x16x16")
    with torch.device("meta"):
        model = CosmosTokenizer(config, encoder=encoder, decoder=decoder)
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if KEYS_TSV.is_file():
        assert keys == release_keys(file)
    lines = sorted(f"{k}\t{'x'.join(map(str, shape))}" for k, shape in keys.items())
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    assert (len(lines), digest) == RELEASE_DIGESTS[file]
    if file == "autoencoder.jit":
        assert sum(p.numel() for p in model.parameters()) == 110_898_294
        assert model.codebook_size == 64000 and model.spatial_compression == 16


# --- loading through real TorchScript files -------------------------------------------------------


class Buffers(nn.Module):
    """Holds constant buffers like the ones NVIDIA's patcher and quantizer put into the .jit
    files."""

    def __init__(self, **buffers):
        super().__init__()
        for name, value in buffers.items():
            self.register_buffer(name, value)


def fsq_buffers(q):
    codebook = q.indices_to_codes(torch.arange(q.codebook_size)[None])[0].T.contiguous()
    return Buffers(_levels=torch.tensor(q.levels, dtype=torch.int32),
                   _basis=torch.tensor(q.basis, dtype=torch.int32), implicit_codebook=codebook)


def wavelet_buffers(**extra):
    return Buffers(wavelets=torch.full((2,), 2 ** -0.5), _arange=torch.arange(2), **extra)


class EncoderJit(nn.Module):
    """NVIDIA's encoder_jit(): Sequential(encoder, quant_conv, quantizer) -> (indices, codes)."""

    def __init__(self, tok):
        super().__init__()
        self.encoder = tok.encoder
        self.quant_conv = tok.quant_conv
        self.fsq = tok.quantizer
        patch_size = torch.tensor([4], dtype=torch.int32)
        self.encoder.patcher3d = wavelet_buffers(patch_size_buffer=patch_size)
        self.quantizer = fsq_buffers(tok.quantizer)

    def forward(self, x):
        codes, idx = self.fsq(self.quant_conv(self.encoder(x)))
        return idx, codes


class DecoderJit(nn.Module):
    """NVIDIA's decoder_jit(): Sequential(inv_quant, post_quant_conv, decoder), indices -> video."""

    def __init__(self, tok):
        super().__init__()
        self.inv_quant = nn.Module()
        self.inv_quant.quantizer = fsq_buffers(tok.quantizer)
        self.post_quant_conv = tok.post_quant_conv
        self.decoder = tok.decoder
        self.fsq = tok.quantizer
        self.decoder.unpatcher3d = wavelet_buffers()

    def forward(self, idx):
        codes = self.fsq.indices_to_codes(idx).to(self.post_quant_conv.conv3d.weight.dtype)
        return self.decoder(self.post_quant_conv(codes))


class AutoencoderJit(nn.Module):
    def __init__(self, tok):
        super().__init__()
        enc = EncoderJit(tok)
        dec = DecoderJit(tok)
        self.encoder = enc.encoder
        self.quant_conv = enc.quant_conv
        self.quantizer = enc.quantizer
        self.post_quant_conv = dec.post_quant_conv
        self.decoder = dec.decoder
        self.fsq = tok.quantizer

    def forward(self, x):
        codes, _ = self.fsq(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(codes.to(x.dtype)))


def save_jit(wrapper, example, file):
    with warnings.catch_warnings():
        # shape-dependent Python branches are fine: only the weights are read back
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    traced.save(str(file))
    return traced


@pytest.fixture(scope="module")
def jit_dir(tiny, tmp_path_factory):
    """encoder.jit / decoder.jit traced in bf16 from the tiny model, plus the bf16-rounded model in
    fp32."""
    d = tmp_path_factory.mktemp("jit")
    tok16 = copy.deepcopy(tiny).to(torch.bfloat16)
    image = rand_images(1, 64, seed=1)
    enc = save_jit(EncoderJit(copy.deepcopy(tok16)), image[:, :, None].bfloat16(),
                   d / "encoder.jit")
    dec = save_jit(DecoderJit(copy.deepcopy(tok16)), torch.randint(0, 64000, (1, 1, 4, 4)),
                   d / "decoder.jit")
    return d, enc, dec, tok16.float(), image


def test_jit_files_load_by_name_and_give_the_same_outputs(jit_dir):
    d, enc, dec, rounded, image = jit_dir
    weights = torch.jit.load(str(d / "decoder.jit")).state_dict()
    assert weights["post_quant_conv.conv3d.weight"].dtype == torch.bfloat16
    tok = CosmosTokenizer.from_pretrained(d, config="dv-tiny")
    assert tok.encoder is not None and tok.decoder is not None
    assert next(tok.parameters()).dtype == torch.float32
    idx = tok.encode(image)
    assert torch.equal(idx, rounded.encode(image))
    rec = tok.decode(idx)
    assert torch.equal(rec, rounded.decode(idx))
    # against the TorchScript modules themselves, which compute in bf16
    with torch.no_grad():
        jit_idx, _ = enc(image[:, :, None].bfloat16())
        jit_rec = dec(idx[:, None]).float()[:, :, 0]
    assert (jit_idx[:, 0] == idx).float().mean() > 0.9
    assert ((jit_rec - rec).pow(2).mean() / rec.pow(2).mean()).sqrt() < 0.03


def test_config_json_next_to_jit_files_selects_the_architecture(jit_dir, tmp_path):
    d, *_ = jit_dir
    for f in ("encoder.jit", "decoder.jit"):
        (tmp_path / f).write_bytes((d / f).read_bytes())
    # no config: DV8x16x16 is assumed
    with pytest.raises(ValueError, match="do not match the tokenizer layout"):
        CosmosTokenizer.from_pretrained(tmp_path)
    cfg = {"model_type": "cosmos_tokenizer", **CosmosConfig.from_name("dv-tiny").to_dict()}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert CosmosTokenizer.from_pretrained(tmp_path).config.channels == 8


def test_half_loading(jit_dir, tmp_path, tiny):
    d, *_, rounded, image = jit_dir
    (tmp_path / "decoder.jit").write_bytes((d / "decoder.jit").read_bytes())
    dec_only = CosmosTokenizer.from_pretrained(tmp_path, config="dv-tiny")
    assert dec_only.encoder is None and dec_only.quant_conv is None
    idx = torch.randint(0, 64000, (1, 4, 4))
    assert torch.equal(dec_only.decode(idx), rounded.decode(idx))
    with pytest.raises(ValueError, match="no encoder"):
        dec_only.encode(image)
    with pytest.raises(FileNotFoundError, match="no encoder weights"):
        CosmosTokenizer.from_pretrained(tmp_path, config="dv-tiny", encoder=True)
    enc_only = CosmosTokenizer.from_pretrained(d, config="dv-tiny", decoder=False)
    assert enc_only.decoder is None
    with pytest.raises(ValueError, match="no decoder"):
        enc_only.decode(idx)
    # autoencoder.jit alone serves both halves, or just one
    auto = tmp_path / "auto"
    auto.mkdir()
    save_jit(AutoencoderJit(copy.deepcopy(tiny)), image[:, :, None], auto / "autoencoder.jit")
    both = CosmosTokenizer.from_pretrained(auto, config="dv-tiny")
    assert torch.equal(both.decode(both.encode(image)), tiny.decode(tiny.encode(image)))
    assert CosmosTokenizer.from_pretrained(auto, config="dv-tiny", encoder=False).encoder is None


def test_safetensors_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "tok")
    # written through cli.write_atomic: no temporary file left beside them
    names = sorted(p.name for p in (tmp_path / "tok").iterdir())
    assert names == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert config["model_type"] == "cosmos_tokenizer"
    loaded = CosmosTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.config == tiny.config
    x = rand_images(2, 32)
    idx = loaded.encode(x)
    assert torch.equal(idx, tiny.encode(x))
    assert torch.equal(loaded.decode(idx), tiny.decode(idx))
    assert CosmosConfig.from_dict(tiny.config.to_dict()) == tiny.config


# --- bad input ------------------------------------------------------------------------------------


def test_bad_images_and_indices(tiny):
    with pytest.raises(ValueError, match="C = 3"):
        tiny.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny.encode(torch.zeros(1, 3, 32, 40))
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny.encode(torch.zeros(1, 3, 24, 32))
    with pytest.raises(ValueError, match="1 \\+ 8k frames"):
        tiny.encode_video(torch.zeros(1, 3, 4, 32, 32))
    with pytest.raises(ValueError, match="0..63999"):
        tiny.decode(torch.full((1, 2, 2), 64000))
    with pytest.raises(ValueError, match="0..63999"):
        tiny.decode(torch.full((1, 2, 2), -1))
    with pytest.raises(ValueError, match="integer"):
        tiny.decode(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="B, h, w"):
        tiny.decode(torch.zeros(2, 2, dtype=torch.long))


def test_decode_takes_codes_of_any_integer_dtype(tiny):
    """Code shards are saved as uint16 (data.py prepare): every integer dtype, numpy or torch,
    decodes to the same image; a value outside the codebook is an error naming the range."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 128, (1, 2, 2), generator=g)  # fits every integer dtype
    want = tiny.decode(idx)
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64):
        arr = idx.numpy().astype(dtype)
        assert torch.equal(tiny.decode(arr), want), dtype
        assert torch.equal(tiny.decode(torch.from_numpy(arr)), want), dtype
        assert torch.equal(tiny.decode_video(arr[:, None])[:, :, 0], want), dtype
    assert as_indices(np.array([[7]], np.uint16), 64000).dtype == torch.long
    for bad, shown in ((np.full((1, 2, 2), 64000, np.uint16), "64000..64000"),
                       (torch.full((1, 2, 2), 65535, dtype=torch.uint16), "65535..65535"),
                       (np.full((1, 2, 2), 2 ** 64 - 1, np.uint64), f"{2 ** 64 - 1}"),
                       (np.full((1, 2, 2), -3, np.int8), "-3..-3")):
        with pytest.raises(ValueError, match=f"indices must lie in 0..63999, got .*{shown}"):
            tiny.decode(bad)
    for bad in (np.zeros((1, 2, 2), np.float32), np.zeros((1, 2, 2), bool), [[[0]]],
                torch.zeros(1, 2, 2, dtype=torch.bool)):
        with pytest.raises(ValueError, match="integer dtype|numpy array"):
            tiny.decode(bad)
    with pytest.raises(ValueError, match="B, h, w"):
        tiny.decode(np.zeros((2, 2), np.uint16))


def test_config_json_with_a_byte_order_mark(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    config.write_bytes(b"\xef\xbb\xbf" + config.read_bytes())
    assert CosmosTokenizer.from_pretrained(tmp_path).config == tiny.config


def test_bad_directories_and_files(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="not found"):
        CosmosTokenizer.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="encoder.jit"):
        CosmosTokenizer.from_pretrained(tmp_path)
    (tmp_path / "decoder.jit").write_bytes(b"this is not a zip archive")
    with pytest.raises(ValueError, match="decoder.jit: not a readable TorchScript file"):
        CosmosTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        CosmosTokenizer.from_pretrained(tmp_path, dtype="float33")
    with pytest.raises(ValueError, match="unknown CosmosConfig keys: bogus"):
        CosmosConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="unknown Cosmos preset"):
        CosmosConfig.from_name("dv4x8x8")
    with pytest.raises(ValueError, match="cannot undo 2 spatial and 2 temporal"):
        CosmosConfig(temporal_compression=16)
    with pytest.raises(ValueError, match="patch_method"):
        CosmosConfig(patch_method="rearrange")


def test_legacy_decoder_layout_is_named(tmp_path):
    tiny_config = CosmosConfig.from_name("dv-tiny").to_dict()
    legacy = CosmosConfig.from_dict({**tiny_config, "legacy_mode": True})
    torch.manual_seed(0)
    tok = CosmosTokenizer(legacy, encoder=False).eval()
    save_jit(DecoderJit(tok), torch.randint(0, 64000, (1, 1, 2, 2)), tmp_path / "decoder.jit")
    with pytest.raises(ValueError) as err:
        CosmosTokenizer.from_pretrained(tmp_path, config="dv-tiny")
    msg = str(err.value)
    assert "missing (first: decoder.up.1.upsample.conv1.conv3d" in msg
    assert "unexpected (first: decoder.up.2.upsample.conv1.conv3d" in msg and "legacy_mode" in msg
    assert CosmosTokenizer.from_pretrained(tmp_path, config=legacy).config.legacy_mode


# --- pixels and the command line ------------------------------------------------------------------


def test_pixel_helpers():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))
    x = pil_to_tensor(img, 64)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    crop = np.asarray(center_crop(img, 64))
    assert crop.shape == (64, 64, 3)
    assert np.array_equal(tensor_to_uint8(x)[0], crop)  # uint8 -> [-1, 1] -> uint8 is lossless
    y = torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.5, -0.995]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert tensor_to_uint8(y)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 1]
    assert tensor_to_pil(y)[0].size == (6, 1)
    assert psnr(crop, crop) == float("inf") and 0 < psnr(crop, 255 - crop) < 20


def test_cli_round_trip_and_errors(tiny, tmp_path, capsys):
    tiny.save_pretrained(tmp_path / "tok")
    Image.fromarray(np.full((80, 96, 3), 100, dtype=np.uint8)).save(tmp_path / "in.png")
    image = str(tmp_path / "in.png")
    main(["--ckpt", str(tmp_path / "tok"), "--image", image, "--out", str(tmp_path / "rec.png"),
          "--size", "64"])
    out = capsys.readouterr().out
    assert "tokens: 4x4" in out and "PSNR:" in out
    assert Image.open(tmp_path / "rec.png").size == (64, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "rec.png", "tok"]
    out = str(tmp_path / "x.png")
    tok = ["--ckpt", str(tmp_path / "tok")]
    cases = {"tokenizer directory not found": ["--ckpt", str(tmp_path / "nowhere")],
             "--size 60 must be a multiple of the tokenizer's spatial compression 16":
                 [*tok, "--size", "60"],
             "--size 0 must be >= 1": [*tok, "--size", "0"],
             "--size -16 must be >= 1": [*tok, "--size", "-16"],
             "cannot read image": [*tok, "--image", str(tmp_path / "tok" / "config.json")],
             "output directory not found": [*tok, "--out", str(tmp_path / "no" / "x.png")],
             "invalid choice: 'float16'": [*tok, "--dtype", "float16"],
             "invalid int value: 'big'": [*tok, "--size", "big"]}
    for needle, extra in cases.items():
        with pytest.raises(SystemExit) as e:
            main(["--image", image, "--out", out, *extra])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("cosmos_tokenizer.py: error: ") and err.count("\n") == 1, err
        assert needle in err, (needle, err)
    assert not (tmp_path / "x.png").exists()
