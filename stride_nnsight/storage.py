"""Every file stride-nnsight writes or reads goes through this module.

Format (version 2): a *manifest* (UTF-8 JSON, the path the caller names) and a *tensor file*
beside it (``<stem>.<digest>.safetensors``, named by the manifest). The manifest holds

* ``format`` (this module's ``FORMAT_VERSION``), ``library``, ``package_version``, ``kind``
  (``"stride_state"``, ``"fit_checkpoint"``, ``"attribution"``, ``"remote_measure_state"``);
* ``metadata``: the saved object with every tensor replaced by a reference into the tensor
  file (plain JSON; tuples, non-string dict keys, non-finite floats and numpy arrays are
  tagged so that they round-trip exactly), and its sha256 (``metadata_sha256``);
* ``tensor_file`` and, per tensor, its dtype, shape and the sha256 of its bytes.

Loading verifies the manifest checksum, the kind, the format version and every tensor's
checksum, and never unpickles anything: safetensors holds raw bytes and the manifest is JSON.

Writes are atomic and survive a kill at any moment: the tensor file is written under a
temporary name and renamed (``os.replace``); its name carries a digest of its content, so it
never replaces the file the current manifest names; the manifest is written last (temporary
file + ``os.replace``); only then is the previous tensor file removed. A reader therefore sees
either the old pair or the new pair, never a mix.

Files of format 1 (a single ``torch.save`` pickle, stride-nnsight 0.1) are still read, with
``torch.load(..., weights_only=True)``, which accepts only tensors and plain containers; a
file that needs more is refused with a message saying how to convert it (``convert_legacy``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "FORMAT_VERSION",
    "StateFileError",
    "save",
    "load",
    "exists",
    "remove",
    "find",
    "convert_legacy",
    "json_safe",
    "tree_hash",
    "CacheFileError",
    "write_manifest",
    "read_json_manifest",
    "create_array",
    "open_array",
    "remove_files",
    "DATA_FORMATS",
    "DataFileError",
    "read_records",
    "write_table",
    "write_text",
    "read_settings_file",
    "read_json",
    "write_arrays",
    "read_arrays",
    "link_or_copy",
    "save_directory",
]

FORMAT_VERSION = 2  # format 1: one torch.save pickle (stride-nnsight 0.1)
LIBRARY = "stride-nnsight"
_TENSOR = "__stride_tensor__"
_TUPLE = "__stride_tuple__"
_ITEMS = "__stride_items__"
_FLOAT = "__stride_float__"
_ARRAY = "__stride_ndarray__"
_TAGS = (_TENSOR, _TUPLE, _ITEMS, _FLOAT, _ARRAY)
_SAFETENSORS_DTYPES = {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                       torch.int16, torch.int8, torch.uint8, torch.bool}


class StateFileError(ValueError):
    """A stride-nnsight file cannot be used: unreadable, truncated, corrupted (checksum),
    of an unknown or newer format, of another kind, or missing an entry. The message names
    the file and what to do."""


def _package_version() -> str:
    from . import __version__

    return __version__


# ------------------------------------------------------------------------------ encoding
def _unsupported(value: Any, where: str) -> TypeError:
    return TypeError(
        f"cannot save {where}: a {type(value).__module__}.{type(value).__name__} is not a tensor or a JSON value. "
        "Saved ids, settings and metadata must be str, int, float, bool, None, lists/tuples of them or dicts; "
        "convert the value first (e.g. str(x) for ids)"
    )


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """``value`` as plain JSON; tensors go to ``tensors`` (keyed by their path ``where``)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else {_FLOAT: repr(float(value))}
    if isinstance(value, torch.Tensor):
        key, n = where, 1
        while key in tensors:
            key, n = f"{where}#{n}", n + 1
        tensors[key] = _plain_tensor(value, where)
        return {_TENSOR: key}
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise _unsupported(value, where)
        return {_ARRAY: _encode(torch.from_numpy(np.ascontiguousarray(value)), tensors, where)}
    if isinstance(value, np.generic):
        return _encode(value.item(), tensors, where)
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value) and not any(k in _TAGS for k in value):
            return {k: _encode(v, tensors, f"{where}/{k}") for k, v in value.items()}
        return {_ITEMS: [[_encode(k, tensors, f"{where}<key {k!r}>"), _encode(v, tensors, f"{where}/{k}")]
                         for k, v in value.items()]}
    raise _unsupported(value, where)


def _plain_tensor(value: torch.Tensor, where: str) -> torch.Tensor:
    if value.layout != torch.strided:
        raise TypeError(f"cannot save {where}: only dense tensors can be saved, got layout {value.layout}")
    if value.dtype not in _SAFETENSORS_DTYPES:
        raise TypeError(f"cannot save {where}: dtype {value.dtype} is not supported by the file format")
    return value.detach().to("cpu").contiguous().clone()


def _decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, inner), = value.items()
        if tag == _TENSOR:
            return tensors[inner]
        if tag == _TUPLE:
            return tuple(_decode(v, tensors) for v in inner)
        if tag == _ITEMS:
            return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in inner}
        if tag == _FLOAT:
            return float(inner)
        if tag == _ARRAY:
            return _decode(inner, tensors).numpy()
    return {k: _decode(v, tensors) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def json_safe(value: Any, where: str = "value") -> Any:
    """``value`` in the manifest's JSON encoding (tuples etc. tagged); raises ``TypeError``
    naming ``where`` for a value that cannot be stored (and for tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    out = _encode(value, tensors, where)
    if tensors:
        raise TypeError(f"{where} holds tensors; expected plain JSON values")
    return out


def _canonical(tree: Any) -> bytes:
    return json.dumps(tree, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _tensor_sha256(t: torch.Tensor) -> str:
    data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
    return hashlib.sha256(memoryview(data) if len(data) else b"").hexdigest()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------- writing
def _write_atomic(target: Path, write: Any) -> None:
    """``write(tmp_path)``, fsync, then ``os.replace`` onto ``target``."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_manifest_quietly(path: Path) -> Optional[dict]:
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _tensor_file_of(path: Path, manifest: Optional[dict]) -> Optional[Path]:
    name = manifest.get("tensor_file") if manifest else None
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        return None
    return path.parent / name


def save(path: str | os.PathLike, kind: str, content: Mapping[str, Any]) -> Path:
    """Write ``content`` (a dict of tensors, JSON values and nested dicts/lists/tuples of
    them) as manifest ``path`` plus a tensor file beside it. Atomic: a kill at any moment
    leaves the previous file (or none) readable. Returns ``path``.

    Raises ``TypeError`` (naming the entry) for a value that is neither a tensor nor JSON.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(dict(content), tensors, kind)
    entries = {key: {"dtype": _dtype_name(t), "shape": list(t.shape), "sha256": _tensor_sha256(t)}
               for key, t in tensors.items()}
    metadata_sha = hashlib.sha256(_canonical(tree)).hexdigest()
    digest = hashlib.sha256(_canonical([path.name, kind, entries, metadata_sha])).hexdigest()[:16]
    tensor_path = path.parent / f"{path.stem}.{digest}.safetensors"
    previous = _tensor_file_of(path, _read_manifest_quietly(path)) if path.exists() else None

    from safetensors.torch import save_file

    _write_atomic(tensor_path, lambda tmp: save_file(tensors, tmp, metadata={"stride_nnsight_kind": kind}))
    manifest = {
        "format": FORMAT_VERSION,
        "library": LIBRARY,
        "package_version": _package_version(),
        "kind": kind,
        "tensor_file": tensor_path.name,
        "tensors": entries,
        "metadata_sha256": metadata_sha,
        "metadata": tree,
    }
    text = json.dumps(manifest, ensure_ascii=False, indent=1, allow_nan=False)
    _write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    if previous is not None and previous != tensor_path:
        with contextlib.suppress(OSError):
            previous.unlink()
    return path


def exists(path: str | os.PathLike) -> bool:
    return Path(path).is_file()


def remove(path: str | os.PathLike) -> None:
    """Delete manifest ``path`` and the tensor file it names (missing files are fine)."""
    path = Path(path)
    if not path.exists():
        return
    tensor_path = _tensor_file_of(path, _read_manifest_quietly(path))
    path.unlink()
    if tensor_path is not None:
        with contextlib.suppress(OSError):
            tensor_path.unlink()


def find(directory: str | os.PathLike, name: str, legacy_name: Optional[str] = None) -> Optional[Path]:
    """The file ``name`` in ``directory`` or, when only that exists, the format-1 ``legacy_name``."""
    for candidate in (name, legacy_name):
        if candidate is not None and (Path(directory) / candidate).is_file():
            return Path(directory) / candidate
    return None


# ------------------------------------------------------------------------------- reading
def _error(path: Path, problem: str, fix: str) -> StateFileError:
    return StateFileError(f"{path}: {problem}. {fix}")


_REWRITE = "Re-create it (fit / save again), or restore an intact copy"


def load(path: str | os.PathLike, kind: str, *, required: Sequence[str] = ()) -> dict[str, Any]:
    """Read a file written by ``save`` (or a format-1 ``torch.save`` file) of ``kind``.

    Verifies format version, kind, manifest and tensor checksums and that every key of
    ``required`` is present. Raises ``FileNotFoundError`` when ``path`` does not exist and
    ``StateFileError`` (naming the file and the fix) for anything else that is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no stride-nnsight file at {path}")
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as err:
        raise _error(path, f"cannot be read ({err})", "Check the path and its permissions") from err
    if head[:2] == b"PK" or head[:1] == b"\x80":
        content = _load_legacy(path)
    elif path.suffix == ".safetensors" and head[8:9] == b"{":
        raise _error(path, "this is the tensor part of a stride-nnsight file", "Pass its manifest, the file "
                     "whose 'tensor_file' names it (e.g. stride_state.json / fit_checkpoint.json)")
    else:
        content = _load_current(path, kind)
    missing = [key for key in required if key not in content]
    if missing:
        raise _error(path, f"the {kind} file has no entry {', '.join(map(repr, missing))} (it is incomplete or "
                     "was written by another program)", _REWRITE)
    return content


def _load_current(path: Path, kind: str) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise _error(path, f"is not a readable stride-nnsight file: the manifest is not valid JSON, it is "
                     f"truncated or corrupted ({err})", _REWRITE) from err
    if not isinstance(manifest, dict) or manifest.get("library") != LIBRARY:
        raise _error(path, "is not a stride-nnsight file (no stride-nnsight manifest)",
                     "Pass a file written by stride-nnsight")
    version = manifest.get("format")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise _error(path, f"was written in file format {version} by stride-nnsight "
                     f"{manifest.get('package_version', '?')}; this stride-nnsight ({_package_version()}) "
                     f"reads formats 1..{FORMAT_VERSION}", "Upgrade stride-nnsight (pip install -U stride-nnsight)")
    if version != FORMAT_VERSION:
        raise _error(path, f"has an unknown file format {version!r} (this version reads 1..{FORMAT_VERSION})",
                     "The file is corrupted or not from stride-nnsight; " + _REWRITE.lower())
    if manifest.get("kind") != kind:
        raise _error(path, f"is a {manifest.get('kind')!r} file, expected kind {kind!r}",
                     f"Pass the right file (this one was written for {manifest.get('kind')!r})")
    for key in ("metadata", "metadata_sha256", "tensors", "tensor_file"):
        if key not in manifest:
            raise _error(path, f"the manifest has no {key!r} entry (it is incomplete)", _REWRITE)
    tree = manifest["metadata"]
    if hashlib.sha256(_canonical(tree)).hexdigest() != manifest["metadata_sha256"]:
        raise _error(path, "file is corrupted: the manifest's metadata does not match its sha256 checksum",
                     _REWRITE)
    tensor_path = _tensor_file_of(path, manifest)
    if tensor_path is None:
        raise _error(path, f"the manifest names an invalid tensor file {manifest.get('tensor_file')!r}",
                     _REWRITE)
    tensors = _load_tensors(path, tensor_path, manifest["tensors"])
    content = _decode(tree, tensors)
    if not isinstance(content, dict):
        raise _error(path, "the manifest's metadata is not a mapping", _REWRITE)
    return content


def _load_tensors(path: Path, tensor_path: Path, entries: Any) -> dict[str, torch.Tensor]:
    if not tensor_path.is_file():
        raise _error(path, f"its tensor file {tensor_path.name} is missing", "Copy the manifest together "
                     "with the .safetensors file it names, or re-create both (fit / save again)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(tensor_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _error(path, f"its tensor file {tensor_path.name} is truncated or unreadable ({err})",
                     _REWRITE) from err
    if not isinstance(entries, dict) or set(entries) != set(tensors):
        raise _error(path, f"file is corrupted: its tensor file {tensor_path.name} holds other tensors than "
                     "the manifest lists", _REWRITE)
    for key, entry in entries.items():
        t = tensors[key]
        ok = isinstance(entry, dict) and entry.get("dtype") == _dtype_name(t) and entry.get("shape") == list(t.shape)
        if not ok or entry.get("sha256") != _tensor_sha256(t):
            raise _error(path, f"file is corrupted: tensor {key!r} in {tensor_path.name} does not match its "
                         "sha256 checksum (or dtype/shape)", _REWRITE)
    return tensors


def _load_legacy(path: Path) -> dict[str, Any]:
    """Format 1: ``torch.save`` output, read with ``weights_only=True`` (no arbitrary code)."""
    import pickle

    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _error(path, "is a format-1 (torch.save) file that holds Python objects other than tensors "
                     "and plain containers, so it is not loaded (unpickling can run arbitrary code)",
                     "If you trust the file and where it came from, convert it once: load it with torch.load with "
                     "weights_only switched off, then stride_nnsight.storage.convert_legacy(obj, new_path, kind) -- or "
                     "re-create it with this version") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise _error(path, f"is a format-1 (torch.save) file that is truncated or unreadable ({err})",
                     _REWRITE) from err
    if not isinstance(content, dict):
        raise _error(path, f"holds a {type(content).__name__}, not a stride-nnsight state dict", _REWRITE)
    version = content.get("format", 1)
    if version != 1:
        raise _error(path, f"is a torch.save file with an unknown format {version!r} (expected 1)",
                     "The file is corrupted or not from stride-nnsight; " + _REWRITE.lower())
    return content


def convert_legacy(content: Mapping[str, Any], path: str | os.PathLike, kind: str) -> Path:
    """Write an already-loaded format-1 dict (e.g. from ``torch.load`` with ``weights_only``
    switched off, on a file you trust) in the current format: manifest ``path`` + tensor file."""
    content = {k: v for k, v in content.items() if k not in ("format", "package_version")}
    return save(path, kind, content)


def tree_hash(values: Iterable[Any]) -> str:
    """sha256 over a sequence of JSON-encodable values (non-JSON values hash by ``repr``)."""
    h = hashlib.sha256()
    for value in values:
        try:
            data = _canonical(json_safe(value))
        except TypeError:
            data = repr(value).encode("utf-8", "backslashreplace")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


# ------------------------------------------------------- memory-mapped arrays (activation cache)
class CacheFileError(StateFileError):
    """A cache file (manifest or array) cannot be used: unreadable, damaged, or of another
    format. The message names the file and says how to rebuild it."""


def write_manifest(path: Path, content: Any) -> None:
    """Write ``content`` (JSON-serialisable) as JSON to ``path`` atomically (temporary file,
    fsync, ``os.replace``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json_manifest(path: Path, kind: str, version: int, keys: Sequence[str],
                       what: str = "cache") -> Optional[dict]:
    """The JSON manifest at ``path``; ``None`` if there is none; `CacheFileError` if it cannot
    be read, is of another ``kind`` or format ``version``, or lacks one of ``keys``."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CacheFileError(
            f"the {what} manifest {path} cannot be read ({type(e).__name__}: {e}): delete the "
            f"directory {path.parent} or pass overwrite=True to rebuild the {what}") from e
    if not isinstance(content, dict) or content.get("kind") != kind:
        raise CacheFileError(
            f"{path} is not a stride-nnsight {what} manifest: use another directory, or pass "
            "overwrite=True to replace it")
    if content.get("format") != version:
        raise CacheFileError(
            f"the {what} {path} has format {content.get('format')!r}, this version reads format "
            f"{version}: pass overwrite=True to rebuild it")
    missing = [key for key in keys if key not in content]
    if missing or not isinstance(content.get("identity"), dict):
        raise CacheFileError(
            f"the {what} manifest {path} lacks {missing or ['identity']}: it is damaged; pass "
            f"overwrite=True to rebuild the {what}")
    return content


def create_array(path: Path, shape: tuple[int, ...], dtype: Any) -> np.memmap:
    """A new ``.npy`` file of ``shape`` / ``dtype`` at ``path``, opened as a writable memmap
    (its content is undefined until written)."""
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=tuple(int(s) for s in shape))


def open_array(path: Path, shape: tuple[int, ...], dtype: Any, writable: bool = False) -> np.memmap:
    """The ``.npy`` file at ``path`` as a memmap (never unpickled: ``allow_pickle`` stays off),
    after checking its shape and dtype."""
    try:
        array = np.lib.format.open_memmap(path, mode="r+" if writable else "r")
    except (OSError, ValueError) as e:
        raise CacheFileError(
            f"cache file {path} cannot be read ({type(e).__name__}: {e}): pass overwrite=True to "
            "rebuild the cache") from e
    if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
        raise CacheFileError(
            f"cache file {path} holds {array.dtype} {tuple(array.shape)}, the manifest says "
            f"{np.dtype(dtype)} {tuple(shape)}: the cache is damaged; pass overwrite=True to rebuild it")
    return array


def remove_files(directory: Path, names: Iterable[str]) -> None:
    """Delete the files ``names`` in ``directory`` if present (other files are left alone)."""
    for name in names:
        (Path(directory) / name).unlink(missing_ok=True)


# ------------------------------------------------------------------------ user data files
#: data files the command line reads (``read_records``) and writes (``write_table``)
DATA_FORMATS = ("JSONL (.jsonl, .ndjson)", "CSV (.csv)", "Parquet (.parquet)",
                "a Hugging Face datasets directory (datasets.save_to_disk)")


class DataFileError(ValueError):
    """A data file that cannot be read as records: the message names the file, the problem and the fix."""


def _data_kind(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() \
                or (path / "state.json").exists():
            return "datasets"
        raise DataFileError(f"{path} is a directory but not a Hugging Face datasets directory (no dataset_info.json "
                            f"/ state.json): pass a file in one of {', '.join(DATA_FORMATS)}")
    suffix = path.suffix.lower()
    kinds = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
    if suffix not in kinds:
        raise DataFileError(f"cannot read {path}: unknown extension {suffix!r}; supported: {', '.join(DATA_FORMATS)}")
    return kinds[suffix]


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}, line {number}: not valid JSON ({e.msg}); each line must be one JSON "
                                    "object, e.g. {\"text\": \"...\"}") from None
            if not isinstance(row, dict):
                raise DataFileError(f"{path}, line {number}: a JSON {type(row).__name__}, expected an object "
                                    "({\"text\": \"...\", ...})")
            rows.append(row)
    return rows


def read_records(path: str | os.PathLike, columns: Sequence[str],
                 optional: Sequence[str] = ()) -> dict[str, list]:
    """The ``columns`` (required) and ``optional`` columns of a data file, as lists of equal length.

    Reads JSONL (one JSON object per line), CSV (header row), Parquet (needs ``pyarrow``) and
    Hugging Face ``datasets`` directories written by ``save_to_disk`` (``load_from_disk``; a
    ``DatasetDict`` must hold exactly one split). Missing optional columns are left out of the
    result. Raises ``FileNotFoundError``, or ``DataFileError`` naming the file and the fix (unknown
    format, bad line, missing column with the columns that exist, no rows, non-text values in a
    required column)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no data file at {path}")
    kind = _data_kind(path)
    if kind == "jsonl":
        rows = _read_jsonl(path)
        available = list(dict.fromkeys(key for row in rows for key in row))
        table = {c: [row.get(c) for row in rows] for c in available}
    else:
        if kind == "csv":
            import pandas as pd

            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        elif kind == "parquet":
            import pandas as pd

            try:
                frame = pd.read_parquet(path)
            except ImportError as e:
                raise DataFileError(f"reading {path} needs pyarrow: pip install pyarrow ({e})") from e
        else:
            try:
                import datasets
            except ImportError as e:
                raise DataFileError(f"reading the datasets directory {path} needs the `datasets` package: "
                                    "pip install datasets") from e
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if len(loaded) != 1:
                    raise DataFileError(f"{path} holds the splits {sorted(loaded)}: save the one split to use "
                                        "(dataset['train'].save_to_disk(...)) and pass that directory")
                loaded = next(iter(loaded.values()))
            frame = loaded.to_pandas()
        available = [str(c) for c in frame.columns]
        table = {str(c): frame[c].tolist() for c in frame.columns}
    n_rows = len(next(iter(table.values()))) if table else 0
    if n_rows == 0:
        raise DataFileError(f"{path} holds no rows")
    missing = [c for c in columns if c not in table]
    if missing:
        raise DataFileError(f"{path} has no column {', '.join(map(repr, missing))}; its columns are {available}: "
                            "name the right one with the --*-field option (e.g. --text-field)")
    for c in columns:
        bad = [i for i, v in enumerate(table[c]) if not isinstance(v, str)]
        if bad:
            raise DataFileError(f"{path}: column {c!r} must hold text; row {bad[0]} holds "
                                f"{type(table[c][bad[0]]).__name__} {table[c][bad[0]]!r} ({len(bad)} such rows)")
    return {c: list(table[c]) for c in list(columns) + [c for c in optional if c in table]}


def write_table(path: str | os.PathLike, frame: Any) -> Path:
    """Write a ``pandas.DataFrame`` as CSV or Parquet (by extension), atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise DataFileError(f"cannot write a table to {path}: use a .csv or .parquet file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        _write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False))
    else:
        _write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file (e.g. an HTML report) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def read_settings_file(path: str | os.PathLike) -> dict[str, Any]:
    """A settings file for the command line: a YAML (.yaml/.yml) or JSON (.json) mapping."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no settings file at {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise DataFileError(f"{path} is not valid YAML: {e}") from None
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path} is not valid JSON: {e}") from None
    else:
        raise DataFileError(f"settings file {path}: use a .yaml, .yml or .json file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DataFileError(f"{path} must hold a mapping of settings (e.g. `n_subsets: 256`), got {type(data).__name__}")
    return data


# ----------------------------------------------------------- evaluation caches and model folders
def read_json(path: str | os.PathLike) -> Any:
    """A JSON file (a cache's manifest). ``OSError`` / ``json.JSONDecodeError`` as raised."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_arrays(path: str | os.PathLike, **arrays: Any) -> Path:
    """Write numpy arrays as an ``.npz`` file atomically (no pickled objects: `read_arrays`
    reads it with ``allow_pickle=False``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a name
            np.savez(fh, **arrays)

    _write_atomic(path, write)
    return path


def read_arrays(path: str | os.PathLike, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an ``.npz`` file written by `write_arrays` (never unpickles)."""
    with np.load(Path(path), allow_pickle=False) as data:
        return {k: np.asarray(data[k]) for k in keys}


def link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Hard-link ``source`` to ``target`` (a finished cache file reused by another cache), or copy
    it where links are not possible."""
    import shutil

    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def save_directory(path: str | os.PathLike, write: Any) -> Path:
    """Fill a folder atomically: ``write(tmp_dir)`` writes into a temporary folder next to
    ``path``, which is then renamed onto ``path`` (an existing one is replaced; if another process
    renamed its own there first, theirs is kept). A reader never sees a half-written folder."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):  # another process put it there first: keep theirs
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def remove_directory(path: str | os.PathLike) -> None:
    """Delete the folder ``path`` and everything in it (a missing folder is fine): a stale cached
    state that can no longer be loaded."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def temporary_directory(prefix: str) -> "contextlib.AbstractContextManager[str]":
    """A temporary folder, removed with its files when the ``with`` block ends (the default
    activation cache of a fit without ``cache_dir`` / ``checkpoint_dir``, kronfluence's factors)."""
    return tempfile.TemporaryDirectory(prefix=prefix)


def persistent_temporary_directory(prefix: str) -> str:
    """A new temporary folder that outlives the call (a tokenizer re-saved for a library that
    reads it from disk later); the operating system's temporary-file cleanup removes it."""
    return tempfile.mkdtemp(prefix=prefix)
