"""Prompt -> umT5 embeddings, as Wan2.2's ``T5EncoderModel`` computes them, without transformers.

Upstream tokenises with ``transformers.AutoTokenizer`` (the fast tokenizer of
``google/umt5-xxl/tokenizer.json``) called with ``padding='max_length', truncation=True,
max_length=512, add_special_tokens=True`` after cleaning each prompt (``clean='whitespace'``:
``ftfy.fix_text``, html-unescape twice, collapse whitespace, strip). The fast tokenizer is the
``tokenizers`` library running that same tokenizer.json; here it is configured exactly as
transformers configures it for those arguments (truncate on the right to ``text_len`` leaving room
for the ``</s>`` the post-processor appends, pad on the right with ``<pad>``). Each prompt's
embedding is the encoder output trimmed to its true token count (``mask.sum()``, ``</s>`` included).
"""
import html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import ftfy
import torch
from tokenizers import Tokenizer

from vidartrain.errors import CheckpointError
from vidartrain.models.wan.t5 import UMT5Encoder, load_umt5_encoder

__all__ = ["clean_prompt", "UMT5Tokenizer", "TextEncoder", "T5_CHECKPOINT_NAME", "T5_TOKENIZER_DIR"]

T5_CHECKPOINT_NAME = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER_DIR = "google/umt5-xxl"
TEXT_LEN = 512

# Upstream collapses whitespace with the `regex` module; Python's `re` differs from it only on
# the ASCII separators U+001C..U+001F, which ftfy.fix_text has already removed as control chars.
_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Upstream's 'whitespace' cleaning: fix mojibake/quotes/ligatures (ftfy), unescape html
    entities twice, then collapse every whitespace run to one space and strip."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip()


class UMT5Tokenizer:
    """The umT5 tokenizer.json, padded/truncated to ``text_len`` with ``</s>`` appended."""

    def __init__(self, tokenizer_file: str | Path, text_len: int = TEXT_LEN,
                 pad_token: str = "<pad>", eos_token: str = "</s>") -> None:
        tokenizer_file = Path(tokenizer_file)
        if not tokenizer_file.is_file():
            raise CheckpointError(f"umT5 tokenizer file {tokenizer_file} does not exist")
        if text_len < 1:
            raise ValueError(f"text_len must be positive, got {text_len}")
        self.text_len = text_len
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        pad_id = self.tokenizer.token_to_id(pad_token)
        eos_id = self.tokenizer.token_to_id(eos_token)
        if pad_id is None or eos_id is None:
            raise CheckpointError(f"{tokenizer_file}: vocabulary lacks the pad token {pad_token!r} or "
                                  f"the eos token {eos_token!r} (umT5 uses '<pad>' = 0 and '</s>' = 1)")
        # umT5's post-processor appends </s>; a file without it would silently change embeddings.
        if self.tokenizer.encode("", add_special_tokens=True).ids != [eos_id]:
            raise CheckpointError(f"{tokenizer_file}: post_processor does not append {eos_token!r} "
                                  f"(umT5 expects 'ids </s>': TemplateProcessing, single '$A </s>')")
        self.pad_id = pad_id
        self.tokenizer.enable_truncation(max_length=text_len, stride=0, strategy="longest_first",
                                         direction="right")
        self.tokenizer.enable_padding(length=text_len, direction="right", pad_id=pad_id,
                                      pad_type_id=0, pad_token=pad_token)

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and tokenise -> (ids, mask), both int64 [len(prompts), text_len]."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, got a single str")
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {index} is {type(prompt).__name__}, expected str")
        encodings = self.tokenizer.encode_batch([clean_prompt(p) for p in prompts],
                                                add_special_tokens=True)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids.reshape(len(prompts), self.text_len), mask.reshape(len(prompts), self.text_len)


class TextEncoder:
    """Frozen umT5 encoder plus tokenizer: prompts -> list of [L_i, dim] embeddings."""

    def __init__(self, encoder: UMT5Encoder, tokenizer: UMT5Tokenizer) -> None:
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                        device: str | torch.device = "cpu", text_len: int = TEXT_LEN,
                        encoder_config: Mapping[str, int | float | bool] | None = None,
                        ) -> "TextEncoder":
        """Load ``ckpt_dir/models_t5_umt5-xxl-enc-bf16.pth`` and
        ``ckpt_dir/google/umt5-xxl/tokenizer.json`` (the Wan2.2 checkpoint layout).
        ``encoder_config``: ``UMT5Encoder`` arguments, umT5-XXL when None."""
        ckpt_dir = Path(ckpt_dir)
        encoder = load_umt5_encoder(ckpt_dir / T5_CHECKPOINT_NAME, dtype=dtype, device=device,
                                    config=encoder_config)
        tokenizer = UMT5Tokenizer(ckpt_dir / T5_TOKENIZER_DIR / "tokenizer.json", text_len=text_len)
        return cls(encoder, tokenizer)

    @property
    def device(self) -> torch.device:
        return self.encoder.token_embedding.weight.device

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """One [L_i, dim] tensor per prompt, in the encoder's dtype; L_i counts the prompt's tokens
        plus </s> (at most text_len)."""
        ids, mask = self.tokenizer(prompts)
        hidden = self.encoder(ids.to(self.device), mask.to(self.device))
        lengths = mask.sum(dim=1).tolist()
        return [h[:length] for h, length in zip(hidden, lengths)]
