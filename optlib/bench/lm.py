"""A tiny character-level language model, trained on a corpus that ships with the kit.

The corpus is the source of a fixed list of modules from CPython 3.11.7's standard library
(`corpus/stdlib-3.11.7.txt`, under the Python license beside it). It ships with the kit rather than
being read from the running interpreter, whose files differ between Python versions: every reader,
on every Python, trains on the same text. `corpus` also returns the character count and a SHA-256
hash of the text, which a study stores.

The model is a small GPT-style transformer (pre-LayerNorm blocks of causal self-attention and an MLP)
written out in a few lines, so that nothing is hidden in a library class.
"""
import hashlib
import math
import pathlib

import torch
from torch import Tensor, nn

import optlib
from optlib.bench.data import Dataset

# The modules in the corpus, in the text's order.
STDLIB_FILES = (
    "textwrap.py",
    "heapq.py",
    "bisect.py",
    "fnmatch.py",
    "glob.py",
    "colorsys.py",
    "string.py",
    "queue.py",
    "sched.py",
    "graphlib.py",
    "random.py",
    "fractions.py",
    "json/decoder.py",
    "json/encoder.py",
)

# A fixed vocabulary, so that the model's shape does not depend on the text: newline and the 95
# printable ASCII characters; any other character (a handful of non-ASCII letters in comments)
# becomes "~".
VOCABULARY = "\n" + "".join(chr(c) for c in range(32, 127))
_INDEX = {c: i for i, c in enumerate(VOCABULARY)}


CORPUS = pathlib.Path(__file__).parent / "corpus" / "stdlib-3.11.7.txt"


def corpus() -> tuple[str, dict]:
    """The text the language model trains on, and a record of it: where it comes from, the files,
    the number of characters and the SHA-256 of the text."""
    text = CORPUS.read_text(encoding="utf-8")
    record = {
        "source": "CPython 3.11.7 standard library",
        "files": list(STDLIB_FILES),
        "characters": len(text),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }
    return text, record


def encode(text: str) -> Tensor:
    """Character indices into VOCABULARY, as int64."""
    other = _INDEX["~"]
    return torch.tensor([_INDEX.get(c, other) for c in text], dtype=torch.long)


def decode(indices) -> str:
    return "".join(VOCABULARY[i] for i in indices)


class Block(nn.Module):
    """x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x)): a pre-LN transformer block."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape  # (B, T, C)
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=2)
        # (B, T, C) -> (B, heads, T, C / heads)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, heads, T, T)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        attention = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        y = (attention @ v).transpose(1, 2).reshape(batch, length, width)
        x = x + self.out(y)
        return x + self.mlp(self.norm2(x))


class CharTransformer(nn.Module):
    """Token and position embeddings, `layers` blocks, a final LayerNorm and a linear read-out."""

    def __init__(self, vocabulary: int, context: int, width: int, layers: int, heads: int):
        super().__init__()
        self.token = nn.Embedding(vocabulary, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary)

    def forward(self, tokens: Tensor) -> Tensor:  # (B, T) int64 -> (B, T, vocabulary) logits
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token(tokens) + self.position(positions)
        return self.head(self.norm(self.blocks(x)))


def char_transformer(
    *, context: int = 64, width: int = 64, layers: int = 2, heads: int = 4, seed: int = 0, dtype=torch.float32
) -> CharTransformer:
    """A CharTransformer over VOCABULARY with weights drawn on the CPU from `seed` (the global random
    state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CharTransformer(len(VOCABULARY), context, width, layers, heads)
    return model.to(dtype)


CONTEXT = 32
"""Characters per window of the book's transformer task (:class:`CharLM` on :func:`windows`)."""


class CharLM(nn.Module):
    """The transformer the optimizer chapters train (2 blocks of width 32, 2 heads, context
    :data:`CONTEXT`), with its logits laid out as (batch, vocabulary, position), the layout that
    F.cross_entropy, bench.train's loss, expects."""

    def __init__(self, seed: int = 0, dtype=torch.float32):
        super().__init__()
        self.transformer = char_transformer(context=CONTEXT, width=32, layers=2, heads=2, seed=seed, dtype=dtype)

    def forward(self, tokens: Tensor) -> Tensor:  # (B, T) -> (B, vocabulary, T)
        return self.transformer(tokens).transpose(1, 2)


def windows(device="cpu", count: int = 1000) -> Dataset:
    """The transformer task's data: `count` windows of CONTEXT characters drawn (seed 0) from the
    first 90% of the corpus to train on, and 256 evenly spaced windows of the last 10% to test on; the
    target of each position is the next character. 1,000 windows are 32,000 characters, a fifth of
    the training text; 6,000 cover it about once."""
    tokens = encode(corpus()[0])
    split = int(0.9 * len(tokens))
    train_tokens, test_tokens = tokens[:split], tokens[split:]
    offsets = torch.arange(CONTEXT)
    starts = torch.randint(len(train_tokens) - CONTEXT, (count, 1), generator=torch.Generator().manual_seed(0))
    test_starts = torch.arange(256)[:, None] * ((len(test_tokens) - CONTEXT - 1) // 256)
    return Dataset(
        train_tokens[starts + offsets], train_tokens[starts + offsets + 1],  # (count, 32) each
        test_tokens[test_starts + offsets], test_tokens[test_starts + offsets + 1],  # (256, 32) each
    ).to(device)


class MuonAndAdamW:
    """Muon on CharLM's hidden matrices (the 2-dimensional parameters inside the blocks), AdamW on
    everything else (embeddings, read-out, norms, biases), as the Muon chapter trains the transformer:
    two optimizers that bench.train steps as one. `params` are CharLM's parameters, in their order."""

    NAMES = [name for name, _ in CharLM().named_parameters()]

    def __init__(self, params, lr: float, adamw_lr: float = 1e-2):
        params = list(params)
        hidden = [p for n, p in zip(self.NAMES, params) if n.startswith("transformer.blocks.") and p.ndim == 2]
        rest = [p for p in params if all(p is not h for h in hidden)]
        self.optimizers = [optlib.Muon(hidden, lr=lr, weight_decay=0.0),
                           optlib.AdamW(rest, lr=adamw_lr, weight_decay=0.0)]

    def zero_grad(self):
        for optimizer in self.optimizers:
            optimizer.zero_grad()

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()
