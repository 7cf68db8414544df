"""The ONNX Runtime embedding path: export once, offline, from the local model; then run it.

`export_onnx` turns the configured sentence-transformers folder into `model.onnx` (fp32) and,
for `onnx-int8`, `model-int8.onnx` (dynamic per-channel int8 quantisation), cached under
`<data>/models/` and keyed by the model folder, so it is built once per data directory (by the
first node to start, under a file lock) and never downloaded. `OnnxEmbedder` then embeds with
onnxruntime and the model's own fast tokenizer, mean or CLS pooling as the model's
`1_Pooling/config.json` says, and L2 normalisation: the same vectors as sentence-transformers
(cosine 1.000 for fp32, about 0.99 for int8 on this model).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger("tellodb.embedder")
ONNX_BACKENDS = ("onnx", "onnx-int8")
CHUNK = 32  # at most this many texts per ONNX run
TOKEN_BUDGET = 256  # and at most about this many padded tokens


def onnx_cache_dir(model_dir: str, data_dir: str) -> Path:
    """Where the exported model of `model_dir` lives: keyed by the folder and its weights' sizes."""
    src = Path(model_dir).resolve()
    sig = [str(src)] + sorted(f"{p.name}:{p.stat().st_size}" for p in src.iterdir() if p.is_file())
    digest = hashlib.blake2b("\n".join(sig).encode(), digest_size=8).hexdigest()
    return Path(data_dir) / "models" / f"{src.name}-{digest}"


def export_onnx(model_dir: str, data_dir: str, backend: str) -> Path:
    """The ONNX file for `backend`, exporting (and quantising) it first if it is not cached yet.

    Each node calls this as it starts. The export runs under an exclusive lock on `export.lock`
    next to the file, so node actors starting together on one machine export once: the others
    wait for the lock, then find the file."""
    out = onnx_cache_dir(model_dir, data_dir)
    fp32 = out / "model.onnx"
    target = out / ("model-int8.onnx" if backend == "onnx-int8" else "model.onnx")
    if target.exists():
        return target
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "export.lock", "ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or its process dies
        if not fp32.exists():
            _export_fp32(model_dir, fp32)
        if backend == "onnx-int8" and not target.exists():
            from onnxruntime.quantization import QuantType, quantize_dynamic

            tmp = target.with_suffix(f".{os.getpid()}.tmp.onnx")
            log.info("Quantising the embedding model to int8 path=%s", target)
            quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8, per_channel=True)
            os.replace(tmp, target)
    return target


def _export_fp32(model_dir: str, path: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    log.info("Exporting the embedding model to ONNX (once per data directory) path=%s", path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    sample = tokenizer(["an example sentence", "another, somewhat longer example sentence"], padding=True,
                       return_tensors="pt")
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in sample]

    class Encoder(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.inner(**dict(zip(names, tensors))).last_hidden_state

    tmp = path.with_suffix(f".{os.getpid()}.tmp.onnx")  # concurrent exporters never collide
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes it treats as constant
        torch.onnx.export(
            Encoder(model), tuple(sample[n] for n in names), str(tmp),
            input_names=names, output_names=["last_hidden_state"],
            dynamic_axes={n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]},
            opset_version=17, dynamo=False,
        )
    os.replace(tmp, path)


class OnnxEmbedder:
    """Same interface as `node.embedder.Embedder`, on onnxruntime."""

    def __init__(self, model_dir: str, onnx_path: Path, threads: int = 1, device: str = "cpu") -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.model_path = model_dir
        self.onnx_path = onnx_path
        self.device = device
        self.threads = max(1, threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        folder = Path(model_dir)
        max_len = 256
        st_config = folder / "sentence_bert_config.json"
        if st_config.exists():
            max_len = int(json.loads(st_config.read_text()).get("max_seq_length", max_len))
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_len)
        self.tokenizer.no_padding()  # padding is done per length-sorted chunk in encode()
        pooling = folder / "1_Pooling" / "config.json"
        self.cls_pooling = pooling.exists() and json.loads(pooling.read_text()).get("pooling_mode_cls_token", False)
        self.dimension = int(self.encode(["dimension probe"]).shape[1])

    def encode(self, texts: list[str]) -> np.ndarray:
        """Normalised vectors in input order. Texts run in length-sorted chunks of CHUNK, so a batch
        pads each text to a similar length rather than to the longest (2.5x faster on chat turns)."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        encoded = self.tokenizer.encode_batch(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i].ids))
        parts: dict[int, np.ndarray] = {}
        for idx in _chunks([len(encoded[i].ids) for i in order], order):
            width = max(len(encoded[i].ids) for i in idx)
            ids = np.zeros((len(idx), width), dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for row, i in enumerate(idx):
                n = len(encoded[i].ids)
                ids[row, :n] = encoded[i].ids
                mask[row, :n] = 1
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            hidden = self.session.run(None, {k: feed[k] for k in self.inputs})[0]
            if self.cls_pooling:
                pooled = hidden[:, 0]
            else:
                m = mask[..., None].astype(np.float32)
                pooled = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
            pooled = pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
            for row, i in enumerate(idx):
                parts[i] = pooled[row]
        return np.ascontiguousarray(np.stack([parts[i] for i in range(len(texts))]), dtype=np.float32)


def _chunks(lengths: list[int], order: list[int]) -> list[list[int]]:
    """Split length-sorted `order` into runs of at most CHUNK texts and about TOKEN_BUDGET padded
    tokens: attention cost grows with width squared, so long texts go in smaller runs."""
    chunks: list[list[int]] = []
    current: list[int] = []
    for length, i in zip(lengths, order):
        if current and (len(current) >= CHUNK or (len(current) + 1) * length > TOKEN_BUDGET):
            chunks.append(current)
            current = []
        current.append(i)
    if current:
        chunks.append(current)
    return chunks
