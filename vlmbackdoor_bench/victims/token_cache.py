"""Frozen-encoder tokens by image content, shared by a base victim and all its clones."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch


class TokenCache:
    """The encoder never trains after the base is built, so an image's tokens are a pure function
    of its bytes: the clean training split, the clean test splits and any image an attack or a
    defense re-uses are encoded once instead of once per stage.

    Tokens live on the CPU in ``dtype`` (None: as the encoder made them, the tiny profile's exact
    float32; OpenFlamingo-3B's 256x1024 tokens are kept in bfloat16, half the memory). The oldest
    entries leave memory beyond ``max_images`` or ``max_bytes``. With a ``directory`` (one per
    base model, named by its store key) tokens also persist on disk, so a later process never
    re-encodes an image; inside ``transient()`` new tokens stay in memory only (one-off images,
    e.g. a defense's masked copies, that no later stage will ask for again).
    """

    def __init__(self, max_images: int = 60_000, directory: Path | None = None,
                 dtype: torch.dtype | None = None, max_bytes: int | None = None):
        self.max_images = max_images
        self.max_bytes = max_bytes
        self.directory = Path(directory) if directory is not None else None
        self.dtype = dtype
        self._tokens: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._persist = True

    @staticmethod
    def key(image: np.ndarray) -> bytes:
        return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()

    @contextlib.contextmanager
    def transient(self) -> Iterator[None]:
        """Within this block new tokens are not written to the disk tier."""
        previous, self._persist = self._persist, False
        try:
            yield
        finally:
            self._persist = previous

    def _file(self, key: bytes) -> Path:
        name = key.hex()
        return self.directory / name[:2] / f"{name}.npy"

    def get(self, key: bytes) -> torch.Tensor | None:
        tokens = self._tokens.get(key)
        if tokens is None and self.directory is not None:
            path = self._file(key)
            if path.exists():
                tokens = torch.from_numpy(np.load(path))
                if self.dtype == torch.bfloat16:  # numpy has no bfloat16: stored as its bits
                    tokens = tokens.view(torch.bfloat16)
                self._remember(key, tokens)
        return tokens

    def put(self, key: bytes, tokens: torch.Tensor) -> torch.Tensor:
        """Keep ``tokens`` (moved to the CPU in the cache's dtype); returns what was kept."""
        # a copy: a row of a batch would otherwise keep the whole batch alive
        tokens = tokens.detach().to("cpu", self.dtype or tokens.dtype, copy=True)
        self._remember(key, tokens)
        if self.directory is not None and self._persist:
            path = self._file(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
            bits = tokens.view(torch.int16) if tokens.dtype == torch.bfloat16 else tokens
            with open(tmp, "wb") as handle:  # np.save would append ".npy" to a bare name
                np.save(handle, bits.numpy())
            os.replace(tmp, path)  # atomic: a reader never sees half a file
        return tokens

    def _remember(self, key: bytes, tokens: torch.Tensor) -> None:
        old = self._tokens.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._tokens[key] = tokens
        self._bytes += tokens.nbytes
        while len(self._tokens) > self.max_images or (
                self.max_bytes is not None and self._bytes > self.max_bytes and len(self._tokens) > 1):
            self._bytes -= self._tokens.popitem(last=False)[1].nbytes

    def clear(self) -> None:
        """Forget the tokens in memory (the encoder changed); a disk tier is never cleared."""
        if self.directory is not None:
            raise RuntimeError("a persistent token cache belongs to a finished encoder")
        self._tokens.clear()
        self._bytes = 0
