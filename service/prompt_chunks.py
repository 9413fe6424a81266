"""How many text-encoder chunks a request's prompts take (sdserve_core.weighted: prompts beyond one window are
encoded chunk by chunk, as A1111 does). Embeddings of different lengths cannot share a pipeline call, so the count
is part of the batch key; it is counted at admission with the model's tokenizer (loaded once per folder)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdserve_core import weighted
from sdserve_core.weighted import Encoder, TokenEmbedding
from service.requests import GenerationRequest

_TOKENIZERS: dict[Path, Any] = {}
_LOCK = threading.Lock()


def _tokenizer(folder: Path) -> Any:
    """The folder's first tokenizer (an SDXL refiner's only one), loaded once."""
    with _LOCK:
        found = _TOKENIZERS.get(folder)
        if found is None:
            from transformers import CLIPTokenizer

            sub = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder / "tokenizer_2"
            found = CLIPTokenizer.from_pretrained(str(sub))
            _TOKENIZERS[folder] = found
        return found


def count(folder: Path, req: GenerationRequest, cfg: bool, vocab: Mapping[str, TokenEmbedding]) -> int:
    """Chunks of the longest prompt the request encodes (negative prompts only with guidance), with the
    embeddings of `vocab` in them."""
    texts = [req.prompt, req.prompt_2]
    if cfg:
        texts += [req.negative_prompt, req.negative_prompt_2]
    encoder = Encoder("text_encoder", None, _tokenizer(folder))
    return max(len(weighted.chunks_of(encoder, t, vocab)) for t in texts)
