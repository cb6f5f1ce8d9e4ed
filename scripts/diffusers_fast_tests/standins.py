"""Offline stand-ins for the tiny hub repositories diffusers' fast pipeline tests load.

diffusers' fast tests build their models from configs in code, but load tokenizers (and the
T5 config) with ``from_pretrained("hf-internal-testing/...")``, which needs the Hugging Face
hub. Where the hub is unreachable, ``install()`` patches transformers' ``from_pretrained`` of
the tokenizer and config classes the target tests use so that those ids load files written
here, in code, into a temporary folder:

* ``hf-internal-testing/tiny-random-clip``: attnctl's byte-level CLIP tokenizer
  (``attnctl.testing.write_byte_tokenizer``: 514 ids, one per byte and per end-of-word byte,
  then ``<|startoftext|>`` and ``<|endoftext|>``; below the tests' ``CLIPTextConfig(vocab_size=1000)``).
  The real repository has a 1000-entry BPE vocabulary: token ids differ, so do text embeddings.
* ``hf-internal-testing/tiny-random-t5``: a ``T5Config`` with the published sizes as best known
  (d_model 32, 5 layers, 4 heads, d_kv 8, d_ff 37, 8 relative-attention buckets, vocab 1103; the
  same numbers diffusers' Allegro test writes out by hand) and a ``T5Tokenizer`` (Unigram) over
  <pad>, </s>, <unk>, the metaspace, printable ASCII characters with and without the word-start
  mark, a few hundred common English words, and 100 sentinel ids: at most 1103 ids.

Any other ``hf-internal-testing/*`` id (or any hub-looking id) that cannot be loaded raises
``StandInMissing`` naming the id. Local folders always go to the original ``from_pretrained``
(diffusers' save/load tests reload tokenizers from a temporary folder).
"""

from __future__ import annotations

import functools
import os
import string
import tempfile
from pathlib import Path
from typing import Any, Callable

CLIP_ID = "hf-internal-testing/tiny-random-clip"
T5_ID = "hf-internal-testing/tiny-random-t5"

#: hf-internal-testing/tiny-random-t5's config.json, as far as it is known here (see the module doc)
T5_CONFIG = {
    "architectures": ["T5ForConditionalGeneration"],
    "model_type": "t5",
    "d_ff": 37,
    "d_kv": 8,
    "d_model": 32,
    "decoder_start_token_id": 0,
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "relu",
    "initializer_factor": 0.002,
    "is_encoder_decoder": True,
    "layer_norm_epsilon": 1e-06,
    "num_decoder_layers": 5,
    "num_heads": 4,
    "num_layers": 5,
    "pad_token_id": 0,
    "relative_attention_num_buckets": 8,
    "vocab_size": 1103,
}

_WORDS = """
a about above after again against all am an and any are as at be because been before being below between both
but by can did do does doing down during each few for from further had has have having he her here hers herself
him himself his how i if in into is it its itself just me more most my myself no nor not now of off on once only
or other our ours ourselves out over own same she should so some such than that the their theirs them themselves
then there these they this those through to too under until up very was we were what when where which while who
whom why will with you your yours yourself yourselves
painting photo photograph picture image drawing portrait landscape sketch render style art artwork
squirrel eating burger cat dog horse bird fish cow sheep lion tiger bear fox rabbit mouse monkey elephant
astronaut riding man woman boy girl child person people face hand hands eye eyes hair head
red green blue yellow black white orange purple pink brown gray grey gold silver dark light bright
big small large little tall short long old young new beautiful cute happy sad good best high quality
tree trees forest mountain mountains river lake sea ocean beach sky cloud clouds sun moon star stars night day
city street house building room table chair car bike boat train road bridge window door wall floor garden
flower flowers grass field snow rain water fire stone rock sand ice wood metal glass
hey hello world test prompt negative blurry ugly bad detailed realistic cartoon anime oil watercolor
""".split()


def _t5_vocab(size: int = 1103, extra_ids: int = 100) -> list[tuple[str, float]]:
    """(piece, score) pairs: specials, metaspace, characters, words; room left for the sentinels."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {p for p, _ in pieces}
    chars = [c for c in string.printable if not c.isspace()]

    def add(piece: str, score: float) -> None:
        if piece not in seen and len(pieces) < size - extra_ids:
            seen.add(piece)
            pieces.append((piece, score))

    for c in chars:  # every character alone and word-initial, so nothing printable is <unk>
        add("\u2581" + c, -8.0)
        add(c, -9.0)
    for word in dict.fromkeys(_WORDS):  # whole words score higher than their characters
        add("\u2581" + word, -3.0)
        add(word, -4.0)
    return pieces


def write_clip(directory: Path) -> Path:
    from attnctl.testing import write_byte_tokenizer

    write_byte_tokenizer(directory)
    return directory


def write_t5(directory: Path) -> Path:
    from transformers import T5Config, T5Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tok = T5Tokenizer(vocab=_t5_vocab(), extra_ids=100, model_max_length=512)
    if len(tok) > T5_CONFIG["vocab_size"]:
        raise RuntimeError(f"stand-in T5 tokenizer has {len(tok)} ids, over the config's vocab")
    tok.save_pretrained(directory)
    T5Config(**{k: v for k, v in T5_CONFIG.items() if k not in ("architectures", "model_type")}).save_pretrained(directory)
    return directory


WRITERS: dict[str, Callable[[Path], Path]] = {CLIP_ID: write_clip, T5_ID: write_t5}


class StandInMissing(OSError):
    """A hub id was asked for that neither the hub (unreachable) nor a stand-in can provide."""


@functools.lru_cache(maxsize=None)
def _root() -> Path:
    return Path(tempfile.mkdtemp(prefix="attnctl-difftests-standins-"))


@functools.lru_cache(maxsize=None)
def standin_path(repo_id: str) -> str:
    """The folder holding ``repo_id``'s stand-in files (written on first use)."""
    if repo_id not in WRITERS:
        raise StandInMissing(
            f"{repo_id!r}: the Hugging Face hub is unreachable and scripts/diffusers_fast_tests has no offline "
            f"stand-in for it (stand-ins: {', '.join(sorted(WRITERS))})"
        )
    return str(WRITERS[repo_id](_root() / repo_id.replace("/", "--")))


#: what happened per id: "stand-in" or "hub"
USED: dict[str, str] = {}


def _looks_like_hub_id(name: Any) -> bool:
    return isinstance(name, str) and not os.path.isdir(name) and name.count("/") == 1 and not name.startswith((".", "/"))


def resolve(repo_id: str, mode: str) -> str:
    """The local folder to load ``repo_id`` from: the hub's (or its cache's) snapshot, else the stand-in.

    Resolving to a folder first matters: transformers 5 builds an *empty* tokenizer, without an
    error, when a tokenizer's files cannot be fetched, so "try the hub, fall back on an error"
    at the ``from_pretrained`` level would silently test with a two-token tokenizer.
    """
    if mode == "auto":
        try:
            from huggingface_hub import constants, snapshot_download

            folder = snapshot_download(repo_id, local_files_only=bool(constants.HF_HUB_OFFLINE))
        except Exception:  # noqa: BLE001 - unreachable, not cached, offline: all mean "use the stand-in"
            pass
        else:
            USED[repo_id] = "hub"
            return folder
    folder = standin_path(repo_id)  # raises StandInMissing for ids without a stand-in
    USED[repo_id] = "stand-in"
    return folder


def _patched(original: Callable, mode: str) -> Callable:
    func = getattr(original, "__func__", original)

    def from_pretrained(cls, name, *args, **kwargs):
        if _looks_like_hub_id(name):
            name = resolve(name, mode)
        return func(cls, name, *args, **kwargs)

    from_pretrained.__wrapped__ = func  # type: ignore[attr-defined]
    from_pretrained.__attnctl_standin__ = True  # type: ignore[attr-defined]
    return classmethod(from_pretrained)


def patch_targets() -> list[type]:
    """The transformers classes whose ``from_pretrained`` the target tests call with hub ids."""
    import transformers

    names = ["AutoTokenizer", "AutoConfig", "CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast",
             "T5Config", "CLIPTextConfig", "PreTrainedTokenizerFast"]
    out = []
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None and cls not in out:
            out.append(cls)
    return out


def install(mode: str = "auto") -> list[str]:
    """Patch the classes' ``from_pretrained`` (``mode``: "auto" = stand-in when the hub fails,
    "always" = stand-in without trying the hub). Returns the patched class names."""
    if mode not in ("auto", "always"):
        raise ValueError(f"stand-in mode {mode!r}: expected auto or always")
    patched = []
    for cls in patch_targets():
        current = cls.__dict__.get("from_pretrained")
        if current is None:  # inherited: patch on this class only, over the inherited one
            current = classmethod(getattr(cls, "from_pretrained").__func__)
        if getattr(getattr(current, "__func__", None), "__attnctl_standin__", False):
            continue
        setattr(cls, "from_pretrained", _patched(current, mode))
        patched.append(cls.__name__)
    return patched
