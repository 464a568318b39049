"""Data for the MosaicBERT recipes: pretraining corpora (tokenize once, pack, cache) and GLUE TSVs.

Nothing here needs the `datasets` package.  `datasets` is used only when a Hub dataset is asked for by name
(`--dataset allenai/c4 ...`) or when a GLUE folder is not available locally, and it is imported lazily.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import REPO_ROOT

logger = logging.getLogger(__name__)

SAMPLE_DIR = REPO_ROOT / "data" / "sample"
CACHE_FORMAT_VERSION = 1
TEXT_SUFFIXES = (".txt", ".text", ".txt.xz", ".txt.gz", ".txt.bz2", ".xz", ".gz", ".bz2")


def default_cache_dir() -> Path:
    env = os.environ.get("MOSAIC_BERT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mosaic_bert_recipes"


# ----------------------------------------------------------------------------------------------------------------
# Reading text files
# ----------------------------------------------------------------------------------------------------------------


def expand_text_files(paths: Sequence[str | os.PathLike] | None) -> list[Path]:
    """Files and directories -> sorted list of text files (plain, .xz, .gz, .bz2). Default: the embedded sample."""
    if not paths:
        paths = [SAMPLE_DIR]
    files: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(TEXT_SUFFIXES))
            if not found:
                raise FileNotFoundError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {p}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"training file or directory not found: {p}")
    return files


def open_text(path: Path, raw=None):
    """A text stream over `path` (plain, .xz/.lzma, .gz, .bz2); `raw`, when given, is the file's already opened binary
    stream, so that the caller can follow how much of the (compressed) file has been read."""
    name = str(path).lower()
    source = raw if raw is not None else path
    if name.endswith(".xz") or name.endswith(".lzma"):
        return lzma.open(source, "rt", encoding="utf-8", errors="replace")
    if name.endswith(".gz"):
        return gzip.open(source, "rt", encoding="utf-8", errors="replace")
    if name.endswith(".bz2"):
        return bz2.open(source, "rt", encoding="utf-8", errors="replace")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace") if raw is not None else open(
        path, encoding="utf-8", errors="replace")


def iter_documents(files: Iterable[Path], progress=None) -> Iterator[list[str]]:
    """Yield documents as lists of paragraphs: one paragraph per line, a blank line ends a document. `progress`, a
    tqdm bar whose total is the files' size in bytes, advances by the bytes read (compressed bytes for .xz etc.)."""
    for path in files:
        with open(path, "rb") as raw, open_text(path, raw) as f:
            doc: list[str] = []
            done = 0
            for line in f:
                line = line.strip()
                if line:
                    doc.append(line)
                elif doc:
                    yield doc
                    doc = []
                    if progress is not None:
                        done = _advance(progress, raw, done)
            if doc:
                yield doc
            if progress is not None:
                _advance(progress, raw, done)


def _advance(progress, raw, done: int) -> int:
    position = raw.tell()
    progress.update(position - done)
    return position


# ----------------------------------------------------------------------------------------------------------------
# Tokenize + pack
# ----------------------------------------------------------------------------------------------------------------


class Packer:
    """MosaicBERT-style packing: the token stream of all documents (documents separated by [SEP]) is cut into
    samples `[CLS] t_1 ... t_{L-2} [SEP]`, every sample exactly `seq_len` tokens long (no padding).  The stream
    tail shorter than a full sample is dropped."""

    def __init__(self, seq_len: int, cls_id: int, sep_id: int):
        if seq_len < 8:
            raise ValueError("max_seq_length must be >= 8")
        self.seq_len = seq_len
        self.body = seq_len - 2
        self.cls_id, self.sep_id = cls_id, sep_id
        self.buffer: list[int] = []
        self.rows: list[np.ndarray] = []

    def add_document(self, ids: list[int]):
        if not ids:
            return
        if self.buffer:
            self.buffer.append(self.sep_id)  # document boundary inside a sample
        self.buffer.extend(ids)
        while len(self.buffer) >= self.body:
            chunk = self.buffer[: self.body]
            del self.buffer[: self.body]
            self.rows.append(np.asarray([self.cls_id, *chunk, self.sep_id], dtype=np.int32))

    def array(self) -> np.ndarray:
        if not self.rows:
            return np.zeros((0, self.seq_len), dtype=np.int32)
        return np.stack(self.rows)


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    vocab = tokenizer.get_vocab()
    for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{tok}\n".encode())
    h.update(str(getattr(tokenizer, "do_lower_case", "")).encode())
    return h.hexdigest()[:16]


def files_fingerprint(files: Sequence[Path]) -> str:
    """Names, sizes and a content hash of the first and last MiB of each file (fast, robust to copying)."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\t{st.st_size}\n".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if st.st_size > (1 << 20):
                fh.seek(max(0, st.st_size - (1 << 20)))
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def tokenize_and_pack(
    files: Sequence[Path],
    tokenizer,
    seq_len: int,
    batch_docs: int = 256,
    max_documents: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, dict]:
    """Tokenize documents (paragraphs joined by a space) with the fast tokenizer in batches, then pack. `progress`
    shows a tqdm bar over the bytes of the files."""
    from tqdm.auto import tqdm

    packer = Packer(seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id)
    n_docs = n_tokens = 0
    t0 = time.time()
    batch: list[str] = []

    def flush():
        nonlocal n_tokens
        if not batch:
            return
        enc = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
                        verbose=False)["input_ids"]
        for ids in enc:
            n_tokens += len(ids)
            packer.add_document(ids)
        batch.clear()

    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="tokenizing",
               disable=not progress)
    for doc in iter_documents(files, progress=bar):
        batch.append(" ".join(doc))
        n_docs += 1
        if len(batch) >= batch_docs:
            flush()
            bar.set_postfix(documents=f"{n_docs:,}", tokens=f"{n_tokens:,}", refresh=False)
        if max_documents and n_docs >= max_documents:
            break
    flush()
    bar.set_postfix(documents=f"{n_docs:,}", tokens=f"{n_tokens:,}", refresh=False)
    bar.close()
    arr = packer.array()
    stats = {
        "documents": n_docs,
        "text_tokens": n_tokens,
        "samples": int(arr.shape[0]),
        "seq_len": seq_len,
        "tokenize_seconds": round(time.time() - t0, 2),
    }
    return arr, stats


def load_or_build_packed(
    files: Sequence[Path],
    tokenizer,
    seq_len: int,
    cache_dir: str | os.PathLike | None = None,
    max_documents: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, dict]:
    """Packed token ids (n_samples, seq_len), from the on-disk cache when the same files/tokenizer/length were seen.

    The cache key hashes the files (names, sizes, first/last MiB), the tokenizer vocabulary and the sequence length;
    the array is stored as `.npy` (uint16 when the vocabulary fits) next to a `.json` with statistics.  Returns
    (array, stats) where stats["cache_hit"] tells whether tokenization was skipped. `progress`: a progress bar
    while tokenizing.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    key_src = json.dumps(
        {
            "v": CACHE_FORMAT_VERSION,
            "files": files_fingerprint(files),
            "tok": tokenizer_fingerprint(tokenizer),
            "seq_len": seq_len,
            "max_documents": max_documents,
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    npy, meta = cache_dir / f"packed-{key}.npy", cache_dir / f"packed-{key}.json"
    if npy.exists() and meta.exists():
        arr = np.load(npy, mmap_mode="r")
        stats = json.loads(meta.read_text())
        stats.update(cache_hit=True, cache_file=str(npy))
        logger.info("Loaded %d packed samples from cache %s (no re-tokenization)", arr.shape[0], npy)
        return arr, stats
    logger.info("Tokenizing %d file(s) into %d-token samples (cache miss, key %s)", len(files), seq_len, key)
    arr, stats = tokenize_and_pack(files, tokenizer, seq_len, max_documents=max_documents, progress=progress)
    stats["files"] = [str(f) for f in files]
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.int32
    tmp = npy.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, arr.astype(dtype))
    os.replace(tmp, npy)
    meta.write_text(json.dumps(stats, indent=2))
    logger.info("Tokenized %d documents, %d tokens -> %d samples in %.1fs; cached at %s", stats["documents"],
                stats["text_tokens"], stats["samples"], stats["tokenize_seconds"], npy)
    arr = np.load(npy, mmap_mode="r")
    stats.update(cache_hit=False, cache_file=str(npy))
    return arr, stats


# ----------------------------------------------------------------------------------------------------------------
# Datasets and the MLM collator
# ----------------------------------------------------------------------------------------------------------------


class PackedDataset(torch.utils.data.Dataset):
    """Rows of a packed (n, seq_len) array, optionally with fixed (pre-computed) MLM labels."""

    def __init__(self, ids: np.ndarray, input_ids_masked: np.ndarray | None = None, labels: np.ndarray | None = None):
        self.ids = ids
        self.masked = input_ids_masked
        self.labels = labels

    def __len__(self):
        return int(self.ids.shape[0])

    def __getitem__(self, i):
        if self.labels is not None:
            return {
                "input_ids": torch.from_numpy(np.asarray(self.masked[i], dtype=np.int64)),
                "labels": torch.from_numpy(np.asarray(self.labels[i], dtype=np.int64)),
            }
        return {"input_ids": torch.from_numpy(np.asarray(self.ids[i], dtype=np.int64))}


class MLMCollator:
    """Masked-LM collator (BERT's 80/10/10 rule) for fixed-length or ragged samples.

    * `mlm_probability` of the non-special, non-pad tokens get a label; of those 80% become [MASK], 10% a random
      token, 10% stay unchanged.  Unlabelled positions (and all padding) get label -100.
    * Samples that already carry `labels` (a pre-masked evaluation set) are only padded and stacked, so evaluation
      uses the same masked positions at every evaluation.
    * Returns input_ids, attention_mask, labels (and token_type_ids when present in the samples).
    """

    def __init__(self, tokenizer, mlm_probability: float = 0.3, pad_to_multiple_of: int | None = 8,
                 random_token_vocab: int | None = None):
        self.pad_id = tokenizer.pad_token_id
        self.mask_id = tokenizer.mask_token_id
        self.mlm_probability = mlm_probability
        self.pad_to_multiple_of = pad_to_multiple_of
        self.vocab = random_token_vocab or len(tokenizer)
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)

    def _pad(self, seqs: list[torch.Tensor], value: int) -> torch.Tensor:
        n = max(len(s) for s in seqs)
        if all(len(s) == n for s in seqs) and not (self.pad_to_multiple_of and n % self.pad_to_multiple_of):
            return torch.stack(seqs)  # packed samples: nothing to pad
        if self.pad_to_multiple_of:
            n = -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out = torch.full((len(seqs), n), value, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = s
        return out

    def mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generator=None):
        labels = input_ids.clone()
        prob = torch.full(labels.shape, self.mlm_probability)
        special = torch.isin(input_ids, self.special) | (attention_mask == 0)
        prob.masked_fill_(special, 0.0)
        selected = torch.bernoulli(prob, generator=generator).bool()
        labels[~selected] = -100
        input_ids = input_ids.clone()
        replace = torch.bernoulli(torch.full(labels.shape, 0.8), generator=generator).bool() & selected
        input_ids[replace] = self.mask_id
        rand = torch.bernoulli(torch.full(labels.shape, 0.5), generator=generator).bool() & selected & ~replace
        input_ids[rand] = torch.randint(self.vocab, labels.shape, dtype=torch.long, generator=generator)[rand]
        return input_ids, labels

    def __call__(self, examples: list[dict]) -> dict:
        ids = [torch.as_tensor(e["input_ids"], dtype=torch.long) for e in examples]
        input_ids = self._pad(ids, self.pad_id)
        attention_mask = self._pad([torch.ones(len(s), dtype=torch.long) for s in ids], 0)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = self._pad([torch.as_tensor(e["token_type_ids"]) for e in examples], 0)
        if "labels" in examples[0]:
            batch["labels"] = self._pad([torch.as_tensor(e["labels"], dtype=torch.long) for e in examples], -100)
        else:
            batch["input_ids"], batch["labels"] = self.mask(input_ids, attention_mask)
        return batch


def premask(ids: np.ndarray, collator: MLMCollator, seed: int = 1234, chunk: int = 1024):
    """Mask an evaluation set once with a fixed seed -> (masked_ids, labels) arrays."""
    g = torch.Generator().manual_seed(seed)
    masked, labels = [], []
    for s in range(0, ids.shape[0], chunk):
        x = torch.from_numpy(np.asarray(ids[s : s + chunk], dtype=np.int64))
        m, lab = collator.mask(x, torch.ones_like(x), generator=g)
        masked.append(m.numpy().astype(np.int32))
        labels.append(lab.numpy().astype(np.int32))
    if not masked:
        return np.zeros((0, ids.shape[1]), np.int32), np.zeros((0, ids.shape[1]), np.int32)
    return np.concatenate(masked), np.concatenate(labels)


class StreamingTextDataset(torch.utils.data.IterableDataset):
    """Hub dataset through `datasets` (optionally streaming), tokenized and packed on the fly.

    Shards by (rank, dataloader worker) so each process sees different documents (the Trainer is run with
    accelerate's dispatch_batches off, so every rank reads its own shard).  Used for `--dataset NAME`.
    """

    def __init__(self, name: str, config: str | None, split: str, text_field: str, tokenizer, seq_len: int,
                 streaming: bool = True, skip_documents: int = 0, take_documents: int | None = None,
                 shuffle_buffer: int = 0, seed: int = 0, data_files=None):
        self.data_files = data_files or None
        self.name, self.config, self.split, self.text_field = name, config, split, text_field
        self.tokenizer, self.seq_len, self.streaming = tokenizer, seq_len, streaming
        self.skip, self.take, self.shuffle_buffer, self.seed = skip_documents, take_documents, shuffle_buffer, seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _source(self):
        try:
            import datasets
        except ImportError as e:  # pragma: no cover
            raise ImportError("--dataset needs the `datasets` package (pip install datasets); "
                              "use --train-files for local text files") from e
        kw = {"data_files": self.data_files} if self.data_files else {}
        ds = datasets.load_dataset(self.name, self.config, split=self.split, streaming=self.streaming, **kw)
        if self.skip:
            ds = ds.skip(self.skip)
        if self.take is not None:
            ds = ds.take(self.take)
        if self.shuffle_buffer and self.streaming:
            ds = ds.shuffle(seed=self.seed + self.epoch, buffer_size=self.shuffle_buffer)
        return ds

    def __iter__(self):
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        shard, nshards = rank * nw + wid, world * nw
        packer = Packer(self.seq_len, self.tokenizer.cls_token_id, self.tokenizer.sep_token_id)
        for i, ex in enumerate(self._source()):
            if i % nshards != shard:
                continue
            ids = self.tokenizer(ex[self.text_field], add_special_tokens=False, verbose=False)["input_ids"]
            packer.add_document(ids)
            while packer.rows:
                yield {"input_ids": torch.from_numpy(packer.rows.pop(0).astype(np.int64))}


# ----------------------------------------------------------------------------------------------------------------
# GLUE
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlueTask:
    name: str  # canonical name used on the command line / in results (e.g. "sst2")
    folder: str  # folder in the official GLUE download layout
    text_a: str | int
    text_b: str | int | None
    label: str | int
    labels: tuple | None  # label strings in id order; None for regression
    metrics: tuple
    header: bool = True
    hub_config: str = ""
    dev_files: tuple = ("dev.tsv",)

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", "CoLA", 3, None, 1, ("0", "1"), ("matthews_correlation",), header=False,
                     hub_config="cola"),
    "sst2": GlueTask("sst2", "SST-2", "sentence", None, "label", ("0", "1"), ("accuracy",), hub_config="sst2"),
    "mrpc": GlueTask("mrpc", "MRPC", "#1 String", "#2 String", "Quality", ("0", "1"), ("accuracy", "f1"),
                     hub_config="mrpc"),
    "qqp": GlueTask("qqp", "QQP", "question1", "question2", "is_duplicate", ("0", "1"), ("accuracy", "f1"),
                    hub_config="qqp"),
    "stsb": GlueTask("stsb", "STS-B", "sentence1", "sentence2", "score", None, ("pearson", "spearmanr"),
                     hub_config="stsb"),
    "mnli": GlueTask("mnli", "MNLI", "sentence1", "sentence2", "gold_label", ("entailment", "neutral", "contradiction"),
                     ("accuracy",), hub_config="mnli", dev_files=("dev_matched.tsv", "dev_mismatched.tsv")),
    "qnli": GlueTask("qnli", "QNLI", "question", "sentence", "label", ("entailment", "not_entailment"), ("accuracy",),
                     hub_config="qnli"),
    "rte": GlueTask("rte", "RTE", "sentence1", "sentence2", "label", ("entailment", "not_entailment"), ("accuracy",),
                    hub_config="rte"),
    "wnli": GlueTask("wnli", "WNLI", "sentence1", "sentence2", "label", ("0", "1"), ("accuracy",), hub_config="wnli"),
}
TASK_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli_matched": "mnli"}


def canonical_task(name: str) -> str:
    n = name.lower()
    n = TASK_ALIASES.get(n, n)
    if n not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; choose from {', '.join(GLUE_TASKS)}")
    return n


def read_glue_tsv(path: Path, task: GlueTask) -> list[dict]:
    """-> [{"a": str, "b": str|None, "label": int|float}] from an official-layout TSV (csv, QUOTE_NONE)."""
    csv.field_size_limit(sys.maxsize)
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader) if task.header else None
        idx = {name: i for i, name in enumerate(header)} if header else {}

        def col(key):
            return key if isinstance(key, int) else idx[key]

        ia, ib, il = col(task.text_a), (col(task.text_b) if task.text_b is not None else None), col(task.label)
        # STS-B / MNLI: the label is the last column; some rows have extra tab-separated fields
        label_is_last = header is not None and il == len(header) - 1
        for r in reader:
            if not r or (header is not None and len(r) < len(header) - 1):
                continue
            raw = r[-1] if label_is_last else r[il]
            if task.is_regression:
                label = float(raw)
            else:
                if raw not in task.labels:
                    continue  # e.g. a missing gold label
                label = task.labels.index(raw)
            rows.append({"a": r[ia], "b": r[ib] if ib is not None else None, "label": label})
    return rows


def load_glue_split(task: GlueTask, split: str, glue_dir: str | os.PathLike | None) -> list[dict]:
    """split: "train" or a dev file stem ("dev", "dev_matched", "dev_mismatched").

    `glue_dir` a folder: read `<glue_dir>/<Task>/<split>.tsv` (FileNotFoundError when absent; no network).
    `glue_dir` None or "hub": `datasets.load_dataset("nyu-mll/glue", ...)` (needs `datasets` and network)."""
    if glue_dir and str(glue_dir) != "hub":
        path = Path(glue_dir) / task.folder / f"{split}.tsv"
        if not path.exists():
            raise FileNotFoundError(f"GLUE file {path} not found")
        return read_glue_tsv(path, task)
    try:
        import datasets
    except ImportError as e:
        raise FileNotFoundError(
            "no GLUE folder given and the `datasets` package is not installed; pass --glue-dir pointing at a "
            "folder in the official GLUE layout") from e
    hub_split = {"dev": "validation", "dev_matched": "validation_matched",
                 "dev_mismatched": "validation_mismatched"}.get(split, split)
    ds = datasets.load_dataset("nyu-mll/glue", task.hub_config, split=hub_split)
    keys = {"cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
            "qqp": ("question1", "question2"), "stsb": ("sentence1", "sentence2"),
            "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2"),
            "wnli": ("sentence1", "sentence2")}[task.name]
    # nyu-mll/glue label ids use the same order as GlueTask.labels
    return [{"a": ex[keys[0]], "b": ex[keys[1]] if keys[1] else None,
             "label": float(ex["label"]) if task.is_regression else int(ex["label"])} for ex in ds]


class GlueDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict], tokenizer, max_length: int, is_regression: bool):
        a = [r["a"] for r in rows]
        b = [r["b"] for r in rows] if rows and rows[0]["b"] is not None else None
        self.enc = tokenizer(a, b, truncation=True, max_length=max_length, return_token_type_ids=True) if rows else {
            "input_ids": [], "token_type_ids": [], "attention_mask": []}
        self.labels = [r["label"] for r in rows]
        self.is_regression = is_regression

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        item = {k: self.enc[k][i] for k in ("input_ids", "token_type_ids", "attention_mask")}
        item["labels"] = float(self.labels[i]) if self.is_regression else int(self.labels[i])
        return item
