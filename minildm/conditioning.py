"""Conditioners of latent diffusion: what turns a condition into the context tokens [N, L, D] of cross-attention.

Every conditioner has a *null condition*, the input that means "no condition": classifier-free guidance and
condition dropout (train.cond_dropout) feed it instead of the real one.

| condition | input | conditioner | context | null condition |
|---|---|---|---|---|
| class label | int64 [N] | `ClassEmbedder` (LDM cin256-v2) | [N, 1, D] | the null class (`null_label`) |
| caption | `WordTokenizer.encode` -> int64 [N, L] | `TransformerEmbedder` (LDM's BERTEmbedder) | [N, L, D] | "" = all <pad> |
| layout | `LayoutTokenizer.encode` -> int64 [N, 3K] | `TransformerEmbedder` (LDM layout2img) | [N, 3K, D] | no boxes = all <pad> |
| prompt | list of str | `FrozenCLIPEmbedder` (Stable Diffusion v1) | [N, 77, 768] | the empty prompt "" |

    >>> tokenizer = WordTokenizer.from_captions(captions)                 # vocabulary of the dataset's captions
    >>> embedder = TransformerEmbedder(512, 4, tokenizer.vocab_size, tokenizer.max_length)
    >>> context = embedder(tokenizer.encode(["a red circle"]))             # [1, L, 512]
    >>> unet(z_t, t, context=context)

The tokenizers are plain Python (no weights); `to_dict` / `from_dict` store them in a checkpoint's metadata.
`TransformerEmbedder` keeps the state_dict names of LDM's x-transformers encoder, so a released
`cond_stage_model.*` loads strictly (tests/test_conditioning.py checks its output against the original).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

PAD, UNK = "<pad>", "<unk>"  # token 0 is always <pad>: an all-<pad> row is the null condition


class ClassEmbedder(nn.Module):
    """LDM's `ClassEmbedder` (ldm/modules/encoders/modules.py): a label becomes one context token, [N] -> [N, 1, D].

    `embedding.weight` is [n_classes, embed_dim] under LDM's name. For classifier-free guidance LDM's cin256-v2
    counts the "no class" label among the classes (n_classes 1001, index 1000): `null_label` is that index when
    the embedder was built with one (`null_class=True` means the last row is the null class).
    """

    def __init__(self, n_classes: int, embed_dim: int, null_class: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(n_classes, embed_dim)
        self.null_label = n_classes - 1 if null_class else None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.ndim != 1:
            got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"class labels must be an int64 tensor [N]; got {got}")
        n_classes = self.embedding.num_embeddings
        if y.device.type == "cpu" and y.numel() and not 0 <= int(y.min()) <= int(y.max()) < n_classes:
            raise ValueError(f"class labels must be in [0, {n_classes}) (this embedder has {n_classes} rows); got "
                             f"[{int(y.min())}, {int(y.max())}]")
        return self.embedding(y)[:, None]  # [N, 1, D]


# ---------------------------------------------------------------------------------------------
# Captions: a word-level tokenizer built from the dataset's own captions (LDM used BERT's WordPiece vocabulary of
# 30522 tokens; a course dataset needs a few dozen words)


class WordTokenizer:
    """Captions -> int64 token ids [N, max_length]: lower-cased words, padded with <pad> (0) at the end.

    Words are runs of letters and digits (an inner apostrophe kept: "don't"); punctuation is dropped, so
    "a red circle, left of a square." has the words [a, red, circle, left, of, a, square]. Vocabulary: 0 <pad>,
    1 <unk> (a word not seen when the tokenizer was built), then the words sorted, so the same captions always
    give the same ids. The empty caption "" is all <pad>: the null condition of classifier-free guidance.
    """

    _WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")

    def __init__(self, words: list[str], max_length: int):
        words = list(words)
        if len(set(words)) != len(words) or PAD in words or UNK in words:
            raise ValueError("the words of a WordTokenizer must be distinct and not <pad> / <unk>")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1; got {max_length}")
        self.vocab = [PAD, UNK, *words]  # token id -> string
        self.index = {word: i for i, word in enumerate(self.vocab)}
        self.max_length = max_length

    @classmethod
    def from_captions(cls, captions: list[str], max_length: int | None = None) -> WordTokenizer:
        """The tokenizer of a dataset: every word of `captions`; max_length (default) the longest caption's words."""
        captions = _as_captions(captions)
        split = [cls.split(caption) for caption in captions]
        longest = max((len(words) for words in split), default=0)
        vocab = sorted({word for words in split for word in words})
        return cls(vocab, max(longest, 1) if max_length is None else max_length)

    @classmethod
    def split(cls, caption: str) -> list[str]:
        """The words of one caption: lower-cased, punctuation dropped."""
        return cls._WORD.findall(caption.lower())

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, captions: list[str], truncate: bool = False) -> torch.Tensor:
        """Captions -> int64 [N, max_length]; a caption with more words is an error unless truncate=True."""
        captions = _as_captions(captions)
        ids = torch.zeros(len(captions), self.max_length, dtype=torch.long)  # <pad> everywhere
        for row, caption in enumerate(captions):
            words = self.split(caption)
            if len(words) > self.max_length and not truncate:
                raise ValueError(f"caption {caption!r} has {len(words)} words; this tokenizer holds at most "
                                 f"{self.max_length} (max_length): shorten it, pass truncate=True, or build the "
                                 "tokenizer with a larger max_length")
            words = words[:self.max_length]
            ids[row, :len(words)] = torch.tensor([self.index.get(w, 1) for w in words], dtype=torch.long)
        return ids

    def decode(self, ids: torch.Tensor) -> list[str]:
        """int64 [N, L] (or [L]) -> N captions: the words joined by spaces, <pad> dropped, unknown words as <unk>."""
        ids = torch.as_tensor(ids)
        rows = ids[None] if ids.ndim == 1 else ids
        if rows.ndim != 2 or rows.is_floating_point():
            raise ValueError(f"token ids must be an integer tensor [N, L]; got {tuple(ids.shape)} {ids.dtype}")
        if rows.numel() and not 0 <= int(rows.min()) <= int(rows.max()) < self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}); got [{int(rows.min())}, "
                             f"{int(rows.max())}]")
        return [" ".join(self.vocab[i] for i in row if i != 0) for row in rows.tolist()]

    def words(self, caption: str) -> list[str]:
        """The token string at each of the max_length positions of `caption` ("<unk>", "<pad>" included).

        Labels for a cross-attention map over the context tokens: `zip(tokenizer.words(c), attention[..., :])`.
        """
        return [self.vocab[i] for i in self.encode([caption], truncate=True)[0].tolist()]

    def null(self, n: int) -> torch.Tensor:
        """The null condition: n empty captions, int64 [n, max_length] of <pad> (= encode([""] * n))."""
        return torch.zeros(n, self.max_length, dtype=torch.long)

    def to_dict(self) -> dict:
        """JSON-serialisable settings (for checkpoint metadata); `from_dict` rebuilds the same tokenizer."""
        return {"kind": "word", "words": self.vocab[2:], "max_length": self.max_length}

    @classmethod
    def from_dict(cls, data: dict) -> WordTokenizer:
        if data.get("kind") != "word":
            raise ValueError(f"not a WordTokenizer's to_dict() (kind={data.get('kind')!r}, expected 'word')")
        return cls(data["words"], data["max_length"])

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length})"


def _as_captions(captions) -> list[str]:
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise ValueError("captions must be a list of str (one per image); for one caption pass [caption]")
    return list(captions)


# ---------------------------------------------------------------------------------------------
# Layouts: LDM's layout-to-image conditioning (paper App. D.3; taming-transformers' ObjectsBoundingBoxConditionalBuilder)


class LayoutTokenizer:
    """Bounding-box layouts -> int64 [N, 3 * max_boxes]: one (class, top-left, bottom-right) token triple per box.

    Corners are snapped to the nearest point of a grid x grid lattice over [0, 1]^2 (points i / (grid - 1), so 0
    and 1 are on it). Vocabulary: 0 <pad>, then the grid*grid lattice points (1 + iy * grid + ix), then the
    num_classes classes (1 + grid*grid + label). Boxes keep their given order (LDM's data pipeline shuffles them);
    unused triples are <pad>, so a layout with no boxes is all <pad>: the null condition.

    LDM's OpenImages model differs only in its numbers: one shared range of 8192 tokens for classes and corners
    (a 90 x 90 lattice, "none" = 8191), at most 30 boxes, and 2 more tokens for the crop: seq 92 = 3 * 30 + 2.
    """

    def __init__(self, num_classes: int, grid: int = 16, max_boxes: int = 30):
        if num_classes < 1 or grid < 2 or max_boxes < 1:
            raise ValueError(f"need num_classes >= 1, grid >= 2, max_boxes >= 1; got {num_classes}, {grid}, "
                             f"{max_boxes}")
        self.num_classes, self.grid, self.max_boxes = num_classes, grid, max_boxes
        self.first_class = 1 + grid * grid  # token of class 0

    @property
    def vocab_size(self) -> int:
        return self.first_class + self.num_classes

    @property
    def max_length(self) -> int:
        return 3 * self.max_boxes

    def encode(self, boxes: list, labels: list) -> torch.Tensor:
        """N layouts -> int64 [N, 3 * max_boxes].

        boxes[i]: float [k_i, 4] (x0, y0, x1, y1) in [0, 1], x1 >= x0, y1 >= y0 (image coordinates, y down);
        labels[i]: int [k_i] in [0, num_classes); k_i <= max_boxes (0 boxes is allowed: all <pad>).
        """
        if len(boxes) != len(labels):
            raise ValueError(f"got {len(boxes)} box lists but {len(labels)} label lists; pass one of each per image")
        tokens = torch.zeros(len(boxes), self.max_length, dtype=torch.long)
        for row, (box, label) in enumerate(zip(boxes, labels)):
            box = torch.as_tensor(box, dtype=torch.float64) if len(box) else torch.zeros(0, 4, dtype=torch.float64)
            label = torch.as_tensor(label).reshape(-1) if len(label) else torch.zeros(0, dtype=torch.long)
            self._check(row, box, label)
            corners = torch.round(box * (self.grid - 1)).long()  # [k, 4] lattice indices (ix0, iy0, ix1, iy1)
            top_left = 1 + corners[:, 1] * self.grid + corners[:, 0]
            bottom_right = 1 + corners[:, 3] * self.grid + corners[:, 2]
            triples = torch.stack([self.first_class + label, top_left, bottom_right], dim=1)  # [k, 3]
            tokens[row, :triples.numel()] = triples.reshape(-1)
        return tokens

    def _check(self, row: int, box: torch.Tensor, label: torch.Tensor) -> None:
        where = f"layout {row}"
        if box.ndim != 2 or box.shape[1] != 4:
            raise ValueError(f"{where}: boxes must be float [k, 4] (x0, y0, x1, y1); got shape {tuple(box.shape)}")
        if label.is_floating_point():
            raise ValueError(f"{where}: labels must be integers; got {label.tolist()}")
        if len(box) != len(label):
            raise ValueError(f"{where} has {len(box)} boxes but {len(label)} labels")
        if len(box) > self.max_boxes:
            raise ValueError(f"{where} has {len(box)} boxes; this tokenizer holds at most {self.max_boxes} "
                             "(max_boxes): drop some or build it with a larger max_boxes")
        if len(box) and not (torch.isfinite(box).all() and box.min() >= 0 and box.max() <= 1):
            raise ValueError(f"{where}: box coordinates must be in [0, 1] (fractions of the image size); got "
                             f"[{box.min().item():.3g}, {box.max().item():.3g}]")
        if (box[:, 2] < box[:, 0]).any() or (box[:, 3] < box[:, 1]).any():
            raise ValueError(f"{where}: boxes are (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0; got {box.tolist()}")
        if len(label) and not 0 <= int(label.min()) <= int(label.max()) < self.num_classes:
            raise ValueError(f"{where}: labels must be in [0, {self.num_classes}); got {label.tolist()}")

    def decode(self, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """int64 [N, 3 * max_boxes] (or one row) -> N (boxes float32 [k, 4] on the lattice, labels int64 [k])."""
        tokens = torch.as_tensor(tokens)
        rows = tokens[None] if tokens.ndim == 1 else tokens
        if rows.ndim != 2 or rows.shape[1] != self.max_length or rows.is_floating_point():
            raise ValueError(f"layout tokens must be integers [N, {self.max_length}]; got {tuple(tokens.shape)}")
        layouts = []
        for row in rows:
            triples = row.reshape(-1, 3)
            used = triples[:, 0] != 0
            is_box = ((triples[:, 0] >= self.first_class) & (triples[:, 0] < self.vocab_size)
                      & ((triples[:, 1:] >= 1) & (triples[:, 1:] < self.first_class)).all(1))
            if not torch.where(used, is_box, (triples == 0).all(1)).all():
                raise ValueError("not a layout of this tokenizer: each triple must be (class, corner, corner) "
                                 f"tokens or all <pad>; got {triples.tolist()}")
            triples = triples[used]
            lattice = triples[:, 1:] - 1  # [k, 2] lattice indices of the two corners
            corners = torch.stack([lattice % self.grid, lattice // self.grid], dim=-1)  # [k, 2, (x, y)]
            boxes = corners.reshape(-1, 4).to(torch.float32) / (self.grid - 1)
            layouts.append((boxes, (triples[:, 0] - self.first_class).long()))
        return layouts

    def null(self, n: int) -> torch.Tensor:
        """The null condition: n layouts without boxes, int64 [n, 3 * max_boxes] of <pad>."""
        return torch.zeros(n, self.max_length, dtype=torch.long)

    def to_dict(self) -> dict:
        """JSON-serialisable settings (for checkpoint metadata); `from_dict` rebuilds the same tokenizer."""
        return {"kind": "layout", "num_classes": self.num_classes, "grid": self.grid, "max_boxes": self.max_boxes}

    @classmethod
    def from_dict(cls, data: dict) -> LayoutTokenizer:
        if data.get("kind") != "layout":
            raise ValueError(f"not a LayoutTokenizer's to_dict() (kind={data.get('kind')!r}, expected 'layout')")
        return cls(data["num_classes"], data["grid"], data["max_boxes"])

    def __repr__(self) -> str:
        return f"LayoutTokenizer(num_classes={self.num_classes}, grid={self.grid}, max_boxes={self.max_boxes})"


# ---------------------------------------------------------------------------------------------
# LDM's TransformerEmbedder / the network of its BERTEmbedder: lucidrains' x-transformers encoder as vendored in
# ldm/modules/x_transformer.py, under its state_dict names (transformer.token_emb, transformer.pos_emb.emb,
# transformer.attn_layers.layers.{i}.{0: norm, 1: block}, transformer.norm, transformer.to_logits)


class TokenAttention(nn.Module):
    """x-transformers' `Attention` (self-attention), tokens [N, L, dim] -> [N, L, dim].

    8 heads of 64 channels whatever `dim` is: to_q, to_k, to_v Linear(dim, 512) without bias,
    softmax(q k^T / sqrt(64)) v over all L tokens (no mask: LDM lets every token attend to the padding too),
    to_out Linear(512, dim) with bias.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_k = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_v = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = (t.view(n, -1, self.heads, self.dim_head).transpose(1, 2)  # [N, heads, L, dim_head]
                   for t in (self.to_q(x), self.to_k(x), self.to_v(x)))
        out = F.scaled_dot_product_attention(q, k, v)  # default scale dim_head^-1/2
        return self.to_out(out.transpose(1, 2).reshape(n, -1, self.heads * self.dim_head))


class TokenFeedForward(nn.Module):
    """x-transformers' `FeedForward(dim, mult=4)`: Linear to 4 dim, GELU (exact), Linear back; [N, L, dim].

    Nested as LDM's (`net.0.0`, `net.2`): net = Sequential(Sequential(Linear, GELU), Dropout, Linear).
    """

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, mult * dim), nn.GELU()), nn.Dropout(dropout),
                                 nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerEncoder(nn.Module):
    """x-transformers' `Encoder(dim, depth)`: `depth` pre-LayerNorm (attention, feed-forward) pairs, [N, L, dim].

    `layers` alternates attention and feed-forward, 2 * depth entries, each [LayerNorm, block]:
    x = x + block(LN(x)). (The original's third entry, `Residual`, has no parameters.)
    """

    def __init__(self, dim: int, depth: int):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), TokenAttention(dim)]))
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), TokenFeedForward(dim)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, block in self.layers:
            x = x + block(norm(x))
        return x


class AbsolutePositionalEmbedding(nn.Module):
    """x-transformers' learned absolute positions: tokens [N, L, ...] -> [1, L, dim] (`emb`, N(0, 0.02) at init)."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(torch.arange(x.shape[1], device=x.device))[None]


class TransformerWrapper(nn.Module):
    """x-transformers' `TransformerWrapper` with `return_embeddings=True`: token ids [N, L] -> [N, L, dim].

    Token embedding + learned absolute position embedding (both N(0, 0.02) at init), the encoder, a final
    LayerNorm. `to_logits` (Linear(dim, vocab)) is never used for embeddings but is registered in LDM's module,
    so it is here too: its weights are in the released files and in LDM's parameter counts.
    """

    def __init__(self, vocab_size: int, max_seq_len: int, dim: int, depth: int, emb_dropout: float = 0.0):
        super().__init__()
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = AbsolutePositionalEmbedding(dim, max_seq_len)
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.attn_layers = TransformerEncoder(dim, depth)
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, vocab_size)
        nn.init.normal_(self.token_emb.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_emb(tokens)  # [N, L, dim]
        x = self.emb_dropout(x + self.pos_emb(x))
        return self.norm(self.attn_layers(x))


class TransformerEmbedder(nn.Module):
    """LDM's `TransformerEmbedder` (= the network of `BERTEmbedder`): token ids int64 [N, L] -> context [N, L, n_embed].

    L <= max_seq_len; token 0 is the tokenizers' <pad>, attended to like any other token (as in LDM). Released
    configurations: text 1280 x 32 layers (vocab 30522, seq 77; 581,994,042 parameters), text 640 x 32
    (186,154,682), layout 512 x 16 (vocab 8192, seq 92; 58,858,496) — to_logits included.
    """

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int, max_seq_len: int = 77,
                 embedding_dropout: float = 0.0):
        super().__init__()
        self.n_embed, self.vocab_size, self.max_seq_len = n_embed, vocab_size, max_seq_len
        self.transformer = TransformerWrapper(vocab_size, max_seq_len, n_embed, n_layer, embedding_dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or tokens.ndim != 2:
            got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be an int64 tensor [N, L] (a tokenizer's encode()); got {got}")
        if not 1 <= tokens.shape[1] <= self.max_seq_len:
            raise ValueError(f"{tokens.shape[1]} tokens per row, but this embedder has positions for 1 to "
                             f"{self.max_seq_len} (max_seq_len); use a tokenizer with max_length <= {self.max_seq_len}")
        if tokens.device.type != "meta" and tokens.numel():
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"token ids must be in [0, {self.vocab_size}) (vocab_size); got [{low}, {high}]: "
                                 "was the embedder built with the tokenizer's vocab_size?")
        return self.transformer(tokens)


# ---------------------------------------------------------------------------------------------
# Stable Diffusion v1's frozen CLIP ViT-L/14 text encoder (Hugging Face transformers)


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights (or the library that runs them) are not on this machine and cannot be fetched."""


# The text tower of CLIP ViT-L/14 (openai/clip-vit-large-patch14): 123,060,480 parameters.
VIT_L14_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768,
                "hidden_act": "quick_gelu"}


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise PretrainedWeightsUnavailable(
            "FrozenCLIPEmbedder runs CLIP through Hugging Face transformers, which is not installed: "
            "pip install 'transformers>=4.30' (or pip install -e '.[dev]')") from error
    return transformers


class FrozenCLIPEmbedder(nn.Module):
    """Stable Diffusion v1's text conditioner: prompts -> CLIP's last hidden state [N, max_length, 768], frozen.

    As SD's `FrozenCLIPEmbedder`: the prompts are tokenized (BOS, words, EOS, padded to max_length = 77,
    truncated), run through `CLIPTextModel` without an attention mask, and the last hidden state of *every*
    position is the context (not the pooled vector). The null condition is the empty prompt "" (`null(n)`).
    `transformer` keeps SD's name, so `cond_stage_model.*` of an SD checkpoint loads (either transformers layout).

    pretrained=False builds the network from `config` (default: ViT-L/14's text tower) with random weights and
    no download; the tokenizer is then fetched only when prompts are given as strings.
    Raises PretrainedWeightsUnavailable when transformers or the weights are missing.
    """

    def __init__(self, version: str = "openai/clip-vit-large-patch14", max_length: int = 77,
                 pretrained: bool = True, config: dict | None = None):
        super().__init__()
        transformers = _transformers()
        self.version, self.max_length, self._tokenizer = version, max_length, None
        if pretrained:
            if config is not None:
                raise ValueError("config is only for pretrained=False (the pretrained model brings its own)")
            self.transformer = self._from_hub(transformers.CLIPTextModel)
        else:
            self.transformer = transformers.CLIPTextModel(transformers.CLIPTextConfig(**(config or VIT_L14_TEXT)))
        positions = self.transformer.config.max_position_embeddings
        if not 1 <= max_length <= positions:
            raise ValueError(f"max_length={max_length} but this CLIP text model has {positions} positions")
        self.transformer.eval().requires_grad_(False)
        self._register_load_state_dict_pre_hook(self._accept_both_layouts)

    def _from_hub(self, kind):
        try:
            return kind.from_pretrained(self.version)
        except OSError as error:  # not cached and no connection (also offline mode), or no such repository
            from huggingface_hub import constants
            raise PretrainedWeightsUnavailable(
                f"the pretrained {kind.__name__} of {self.version!r} is not in the Hugging Face cache "
                f"({constants.HF_HUB_CACHE}; set HF_HOME to move it) and could not be downloaded "
                f"(HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)}). On a machine with internet run "
                f"`huggingface-cli download {self.version}` (or any from_pretrained) with the same HF_HOME, or "
                f"use FrozenCLIPEmbedder(pretrained=False) for random weights. Cause: {error}") from error

    @property
    def tokenizer(self):
        """The CLIP BPE tokenizer of `version`, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = self._from_hub(_transformers().CLIPTokenizer)
        return self._tokenizer

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> int64 [N, max_length] CLIP token ids (SD's padding="max_length", truncation=True)."""
        prompts = _as_captions(prompts)
        return self.tokenizer(prompts, truncation=True, max_length=self.max_length, padding="max_length",
                              return_tensors="pt")["input_ids"]

    def forward(self, prompts: list[str] | torch.Tensor) -> torch.Tensor:
        """Prompts (list of str) or their token ids int64 [N, max_length] -> context [N, max_length, hidden]."""
        tokens = prompts if isinstance(prompts, torch.Tensor) else self.tokenize(prompts)
        device = self.transformer.get_input_embeddings().weight.device
        return self.transformer(input_ids=tokens.to(device)).last_hidden_state

    def null(self, n: int) -> list[str]:
        """The null condition: n empty prompts (SD's unconditional_conditioning)."""
        return [""] * n

    def train(self, mode: bool = True) -> FrozenCLIPEmbedder:
        """Frozen: the CLIP network stays in eval mode whatever the caller asks (SD's disabled_train)."""
        return super().train(False)

    def convert_state_dict(self, state_dict: dict, prefix: str = "") -> dict:
        """The keys of either transformers layout under `prefix + "transformer."` renamed to this module's, in place;
        returns state_dict. transformers < 5 nests the network as `text_model.*` and stores
        `embeddings.position_ids` (SD's released files); transformers >= 5 does neither. Other keys are unchanged."""
        own = self.transformer.state_dict()
        base = prefix + "transformer."
        for key in [k for k in state_dict if k.startswith(base)]:
            name = key[len(base):]
            if name not in own:
                renamed = name.removeprefix("text_model.") if name.startswith("text_model.") else "text_model." + name
                if renamed in own:
                    state_dict[base + renamed] = state_dict.pop(key)
                elif name.endswith("embeddings.position_ids"):  # a buffer this version does not save: arange(L)
                    state_dict.pop(key)
        return state_dict

    def _accept_both_layouts(self, state_dict, prefix, *args) -> None:
        """load_state_dict's pre-hook: `convert_state_dict` on the incoming keys."""
        self.convert_state_dict(state_dict, prefix)
