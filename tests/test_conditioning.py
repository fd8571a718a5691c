"""Latent diffusion's conditioners and its checkpoint layout: the cin256-v2 class embedder (released keys and
count); the word and layout tokenizers (round trips, the null condition, errors); LDM's TransformerEmbedder (parity
with the original x-transformers encoder, the released parameter counts); SD's frozen CLIP text encoder (count,
the error without weights); and every key of the released LatentDiffusion files routed to its part by prefix."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import decode_parity_weights
from safetensors.torch import load_file

from minildm import checkpoints, conditioning, unet
from minildm.layers import count_parameters


def test_class_embedder_is_ldm_s_and_gives_one_token(reference_dir):
    manifest = json.loads((reference_dir / "manifests" / "ldm_cin256_v2_class_embedder.json").read_text())
    kwargs = manifest["constructor_kwargs"]
    embedder = conditioning.ClassEmbedder(kwargs["n_classes"], kwargs["embed_dim"], null_class=True)
    assert count_parameters(embedder) == manifest["total_params"] == 512_512
    assert {k: list(v.shape) for k, v in embedder.state_dict().items()} == manifest["keys"]
    assert embedder.null_label == 1000  # cin256-v2's "unconditional" class
    y = torch.tensor([0, 999, 1000])
    context = embedder(y)
    assert context.shape == (3, 1, 512) and torch.equal(context[:, 0], embedder.embedding.weight[y])
    with pytest.raises(ValueError, match=r"in \[0, 1001\)"):
        embedder(torch.tensor([1001]))
    with pytest.raises(ValueError, match="int64 tensor"):
        embedder(torch.tensor([0.5]))


@pytest.mark.parametrize("name, unet_manifest, parts", [
    ("ldm_cin256_v2_full_checkpoint", "ldm_cin256_v2_unet", {"unet": 688, "first_stage": 205, "cond_stage": 1}),
    ("ldm_celebahq256_full_checkpoint", "ldm_celebahq256_unet", {"unet": 368, "unet_ema": 368, "first_stage": 205}),
    ("ldm_lsun_churches256_full_checkpoint", "ldm_lsun_churches256_unet",
     {"unet": 520, "unet_ema": 520, "first_stage": 248}),
    ("sd_v1_full_checkpoint", "sd_v1_unet", {"unet": 686, "first_stage": 248}),
])
def test_every_key_of_a_released_latent_diffusion_file_is_routed(reference_dir, name, unet_manifest, parts):
    manifest = json.loads((reference_dir / "manifests" / f"{name}.json").read_text())
    unet_keys = json.loads((reference_dir / "manifests" / f"{unet_manifest}.json").read_text())["keys"]
    split = checkpoints.split_ldm_state_dict(manifest["keys"], unet_keys=list(unet_keys))
    assert split["unused"] == []
    assert {part: len(split[part]) for part in parts} == parts
    assert len(split["schedule"]) == 12
    assert split["unet"] == unet_keys  # the UNet's own names and shapes, prefix removed
    if "unet_ema" in parts:  # LitEma's dot-less names map back onto the UNet's, one to one
        assert split["unet_ema"] == {k: v for k, v in unet_keys.items() if "running" not in k}
        assert set(split["ema_state"]) == {"decay", "num_updates"}
    if "first_stage" in parts:
        first = {"first_stage_model." + k for k in split["first_stage"]}
        assert first == {k for k in manifest["keys"] if k.startswith("first_stage_model.")}
    assert ("scale_factor" in split) == ("scale_factor" in manifest["keys"])
    # an unexpected key is named, not dropped
    extra = checkpoints.split_ldm_state_dict({**manifest["keys"], "logvar_extra": [1]}, unet_keys=list(unet_keys))
    assert extra["unused"] == ["logvar_extra"]


def test_the_unet_of_a_released_file_has_exactly_the_routed_keys(reference_dir):
    manifest = json.loads((reference_dir / "manifests" / "sd_v1_unet.json").read_text())
    full = json.loads((reference_dir / "manifests" / "sd_v1_full_checkpoint.json").read_text())["keys"]
    with torch.device("meta"):
        model = unet.UNet(unet.config_from_original(manifest["constructor_kwargs"]))
    split = checkpoints.split_ldm_state_dict(full, unet_keys=list(model.state_dict()))
    assert split["unet"] == {k: list(v.shape) for k, v in model.state_dict().items()}



# ---------------------------------------------------------------------------------------------
# WordTokenizer

CAPTIONS = ["A red circle, left of a blue square.", "a blue triangle", "Two  red squares don't touch", ""]


def test_word_tokenizer_vocabulary_is_pad_unk_then_sorted_words_and_deterministic():
    tokenizer = conditioning.WordTokenizer.from_captions(CAPTIONS)
    assert tokenizer.vocab[:2] == ["<pad>", "<unk>"]
    assert tokenizer.vocab[2:] == sorted(tokenizer.vocab[2:]) and "," not in tokenizer.vocab  # punctuation dropped
    assert tokenizer.vocab_size == 2 + 12 and tokenizer.max_length == 8  # the longest caption's words
    shuffled = conditioning.WordTokenizer.from_captions(CAPTIONS[::-1])
    assert shuffled.vocab == tokenizer.vocab and torch.equal(shuffled.encode(CAPTIONS), tokenizer.encode(CAPTIONS))
    assert conditioning.WordTokenizer.split("Left-of: DON'T, x2!") == ["left", "of", "don't", "x2"]


def test_word_tokenizer_round_trip_padding_and_unknown_words():
    tokenizer = conditioning.WordTokenizer.from_captions(CAPTIONS)
    ids = tokenizer.encode(CAPTIONS)
    assert ids.dtype == torch.long and ids.shape == (4, 8)
    assert tokenizer.decode(ids) == [" ".join(tokenizer.split(c)) for c in CAPTIONS]
    assert tokenizer.decode(ids[1]) == ["a blue triangle"] and ids[1, 3:].eq(0).all()  # padded at the end
    unknown = tokenizer.encode(["a green circle"])[0]
    assert unknown[:3].tolist() == [tokenizer.index["a"], 1, tokenizer.index["circle"]]
    assert tokenizer.decode(unknown) == ["a <unk> circle"]
    assert tokenizer.words("a green circle") == ["a", "<unk>", "circle"] + ["<pad>"] * 5  # one label per position


def test_the_empty_caption_is_the_null_condition():
    tokenizer = conditioning.WordTokenizer.from_captions(CAPTIONS)
    assert torch.equal(tokenizer.encode([""] * 3), tokenizer.null(3))
    assert tokenizer.null(3).shape == (3, 8) and tokenizer.null(3).dtype == torch.long and not tokenizer.null(3).any()
    assert tokenizer.decode(tokenizer.null(1)) == [""]


def test_word_tokenizer_survives_json_and_checkpoint_metadata():
    tokenizer = conditioning.WordTokenizer.from_captions(CAPTIONS, max_length=9)
    again = conditioning.WordTokenizer.from_dict(json.loads(json.dumps(tokenizer.to_dict())))
    assert again.vocab == tokenizer.vocab and again.max_length == 9
    assert torch.equal(again.encode(CAPTIONS), tokenizer.encode(CAPTIONS))
    with pytest.raises(ValueError, match="not a WordTokenizer"):
        conditioning.WordTokenizer.from_dict(conditioning.LayoutTokenizer(3).to_dict())


def test_word_tokenizer_errors_say_what_to_do():
    tokenizer = conditioning.WordTokenizer.from_captions(["a red circle"])
    with pytest.raises(ValueError, match=r"has 4 words; this tokenizer holds at most 3 \(max_length\)"):
        tokenizer.encode(["a red red circle"])
    assert tokenizer.decode(tokenizer.encode(["a red red circle"], truncate=True)) == ["a red red"]
    with pytest.raises(ValueError, match=r"list of str .* pass \[caption\]"):
        tokenizer.encode("a red circle")
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 5\)"):
        tokenizer.decode(torch.tensor([[7, 0, 0]]))
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        conditioning.WordTokenizer.from_captions(["a"], max_length=0)


# ---------------------------------------------------------------------------------------------
# TransformerEmbedder (LDM's x-transformers encoder)

TRANSFORMER = "ldm_transformer_embedder_tiny"


@pytest.mark.parametrize("n_embed, n_layer, vocab_size, max_seq_len, total", [
    (1280, 32, 30522, 77, 581_994_042),  # txt2img-1p4B-eval
    (640, 32, 30522, 77, 186_154_682),  # text2img256
    (512, 16, 8192, 92, 58_858_496),  # layout2img-openimages256
])
def test_transformer_embedder_has_the_released_parameter_counts(n_embed, n_layer, vocab_size, max_seq_len, total):
    with torch.device("meta"):
        embedder = conditioning.TransformerEmbedder(n_embed, n_layer, vocab_size, max_seq_len)
    assert count_parameters(embedder) == total
    # the unused to_logits head is part of LDM's module, its files and its counts
    assert count_parameters(embedder.transformer.to_logits) == n_embed * vocab_size + vocab_size
    # per layer: attention 7 keys (norm 2, to_q/k/v, to_out 2), feed-forward 6; + token_emb, pos_emb, norm, to_logits
    assert len(embedder.state_dict()) == 13 * n_layer + 6
    assert not list(embedder.buffers())


def test_transformer_embedder_matches_latent_diffusion(reference_dir):
    folder = reference_dir / "parity"
    meta = json.loads((folder / f"{TRANSFORMER}.json").read_text())
    io = load_file(folder / meta["io_file"])
    embedder = conditioning.TransformerEmbedder(**meta["config"]).eval()
    assert count_parameters(embedder) == meta["total_params"] == 151_144
    assert {k: list(v.shape) for k, v in embedder.state_dict().items()} == meta["state_dict_keys"]
    assert list(embedder.state_dict()) == list(meta["state_dict_keys"])  # LDM's names, in LDM's order
    embedder.load_state_dict(decode_parity_weights(folder, meta), strict=True)
    seen = {}
    layers = embedder.transformer.attn_layers.layers
    hooks = [layers[2 * i][0].register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].mean(1)))
             for i in range(len(layers) // 2)]  # the input of each self-attention layer, as the original's hiddens
    with torch.no_grad():
        z = embedder(io["inputs.tokens"])
        for hook in hooks:
            hook.remove()
        z_short = embedder(io["inputs.tokens_short"])
    for i, value in seen.items():
        torch.testing.assert_close(value, io[f"probe.attn_layers.hiddens.{i}"], atol=1e-5, rtol=1e-4,
                                   msg=f"first divergence before self-attention layer {i}")
    torch.testing.assert_close(z, io["outputs.z"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(z_short, io["outputs.z_short"], atol=1e-5, rtol=1e-4)
    assert meta["released_bert_embedders"]["txt2img-1p4B-eval"]["total_params"] == 581_994_042


def test_transformer_embedder_shapes_gradients_and_padding_is_attended():
    torch.manual_seed(0)
    embedder = conditioning.TransformerEmbedder(32, 2, 20, 8)
    tokens = torch.randint(1, 20, (3, 5))
    context = embedder(tokens)
    assert context.shape == (3, 5, 32) and context.dtype == torch.float32
    context.square().mean().backward()
    unused = {n for n, _ in embedder.transformer.to_logits.named_parameters(prefix="transformer.to_logits")}
    for name, param in embedder.named_parameters():
        if name in unused:
            assert param.grad is None
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    with torch.no_grad():  # no attention mask (as LDM): the words attend to the padding too
        padded = torch.tensor([[3, 4, 0, 0]])
        assert not torch.allclose(embedder(padded)[:, :2], embedder(padded[:, :3])[:, :2])


def test_transformer_embedder_errors_say_what_to_pass():
    embedder = conditioning.TransformerEmbedder(16, 1, 10, 6)
    with pytest.raises(ValueError, match=r"int64 tensor \[N, L\]"):
        embedder(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"int64 tensor \[N, L\]"):
        embedder(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"7 tokens per row, but this embedder has positions for 1 to 6"):
        embedder(torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 10\) \(vocab_size\); got \[0, 10\]"):
        embedder(torch.tensor([[0, 10]]))


# ---------------------------------------------------------------------------------------------
# LayoutTokenizer

def test_layout_tokens_are_class_top_left_bottom_right_triples():
    tokenizer = conditioning.LayoutTokenizer(num_classes=5, grid=5, max_boxes=3)
    assert tokenizer.vocab_size == 1 + 25 + 5 and tokenizer.max_length == 9
    tokens = tokenizer.encode([[[0.0, 0.25, 1.0, 0.5]], []], [[4], []])
    assert tokens.dtype == torch.long and tokens.shape == (2, 9)
    # class 4 -> 1 + 25 + 4; (x 0, y 1) -> 1 + 1*5 + 0; (x 4, y 2) -> 1 + 2*5 + 4; then <pad>
    assert tokens[0].tolist() == [30, 6, 15] + [0] * 6
    assert torch.equal(tokens[1:], tokenizer.null(1))  # no boxes = the null condition


def test_layout_round_trip_at_grid_resolution():
    tokenizer = conditioning.LayoutTokenizer(num_classes=10, grid=16, max_boxes=4)
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(3, 4, 2, 2, generator=generator).sort(dim=2).values  # [N, boxes, (min, max), (x, y)]
    boxes = [corners[i, :k].permute(0, 2, 1).reshape(k, 4)[:, [0, 2, 1, 3]] for i, k in enumerate([4, 2, 0])]
    labels = [torch.randint(0, 10, (len(b),), generator=generator) for b in boxes]
    tokens = tokenizer.encode(boxes, labels)
    decoded = tokenizer.decode(tokens)
    for (box, label), want_box, want_label in zip(decoded, boxes, labels):
        assert torch.equal(label, want_label) and box.dtype == torch.float32 and box.shape == want_box.shape
        if len(box):  # each corner snapped to the nearest of the 16 lattice points per axis
            assert (box - want_box).abs().max() <= 0.5 / 15 + 1e-6
    assert torch.equal(tokenizer.encode(*zip(*decoded)), tokens)  # lattice points encode to themselves
    again = conditioning.LayoutTokenizer.from_dict(json.loads(json.dumps(tokenizer.to_dict())))
    assert torch.equal(again.encode(boxes, labels), tokens)
    embedder = conditioning.TransformerEmbedder(16, 1, tokenizer.vocab_size, tokenizer.max_length)
    assert embedder(tokens).shape == (3, 12, 16)  # layout tokens feed LDM's TransformerEmbedder


def test_layout_errors_say_what_is_wrong():
    tokenizer = conditioning.LayoutTokenizer(num_classes=3, grid=4, max_boxes=2)
    box = [[0.1, 0.1, 0.5, 0.5]]
    with pytest.raises(ValueError, match=r"in \[0, 1\] \(fractions of the image size\)"):
        tokenizer.encode([[[0.1, 0.1, 1.5, 0.5]]], [[0]])
    with pytest.raises(ValueError, match="x1 >= x0 and y1 >= y0"):
        tokenizer.encode([[[0.5, 0.1, 0.1, 0.5]]], [[0]])
    with pytest.raises(ValueError, match=r"3 boxes; this tokenizer holds at most 2 \(max_boxes\)"):
        tokenizer.encode([box * 3], [[0, 1, 2]])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        tokenizer.encode([box], [[3]])
    with pytest.raises(ValueError, match="1 boxes but 2 labels"):
        tokenizer.encode([box], [[0, 1]])
    with pytest.raises(ValueError, match=r"float \[k, 4\]"):
        tokenizer.encode([[0.1, 0.1, 0.5, 0.5]], [[0]])
    with pytest.raises(ValueError, match="one of each per image"):
        tokenizer.encode([box], [])
    with pytest.raises(ValueError, match=r"\(class, corner, corner\) tokens or all <pad>"):
        tokenizer.decode(torch.tensor([[1, 2, 3, 0, 0, 0]]))  # a corner token where the class should be


# ---------------------------------------------------------------------------------------------
# FrozenCLIPEmbedder (Stable Diffusion v1)

def test_clip_text_encoder_of_vit_l14_has_123m_parameters():
    pytest.importorskip("transformers")
    with torch.device("meta"):
        embedder = conditioning.FrozenCLIPEmbedder(pretrained=False)
    assert count_parameters(embedder) == 123_060_480  # SD's "123M text encoder"
    config = embedder.transformer.config
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size, config.hidden_act) == (
        768, 12, 49408, "quick_gelu")
    assert not any(p.requires_grad for p in embedder.parameters()) and not embedder.train().transformer.training


def test_clip_embedder_returns_every_position_and_loads_either_key_layout():
    pytest.importorskip("transformers")
    tiny = dict(conditioning.VIT_L14_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, vocab_size=100, max_position_embeddings=12, projection_dim=32)
    torch.manual_seed(0)
    embedder = conditioning.FrozenCLIPEmbedder(max_length=12, pretrained=False, config=tiny)
    tokens = torch.randint(0, 100, (2, 12))
    context = embedder(tokens)
    assert context.shape == (2, 12, 32)  # last_hidden_state, not the pooled vector
    assert embedder.null(2) == ["", ""]
    # SD v1's files (transformers 4.x): transformer.text_model.* and the position_ids buffer
    other = conditioning.FrozenCLIPEmbedder(max_length=12, pretrained=False, config=tiny)
    sd_style = {k.replace("transformer.", "transformer.text_model.", 1) if "text_model" not in k else k: v
                for k, v in embedder.state_dict().items()}
    sd_style["transformer.text_model.embeddings.position_ids"] = torch.arange(12)[None]
    other.load_state_dict(sd_style, strict=True)
    torch.testing.assert_close(other(tokens), context)
    with pytest.raises(ValueError, match="max_length=13 but this CLIP text model has 12 positions"):
        conditioning.FrozenCLIPEmbedder(max_length=13, pretrained=False, config=tiny)


def test_clip_embedder_without_weights_or_transformers_raises_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    # a fresh process: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    code = ("from minildm import conditioning\n"
            "try:\n    conditioning.FrozenCLIPEmbedder()\n"
            "except conditioning.PretrainedWeightsUnavailable as error:\n    print('RAISED', error)\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                            check=False, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    message = result.stdout
    assert message.startswith("RAISED") and "'openai/clip-vit-large-patch14'" in message
    assert str(tmp_path) in message and "huggingface-cli download openai/clip-vit-large-patch14" in message
    assert issubclass(conditioning.PretrainedWeightsUnavailable, RuntimeError)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(conditioning.PretrainedWeightsUnavailable, match=r"pip install 'transformers>=4.30'"):
        conditioning.FrozenCLIPEmbedder(pretrained=False)
