"""Per-study cache of computed quantitative maps, so a re-analysis does not refit unchanged studies.

A patient is re-analysed whenever something of theirs arrives (a new follow-up, a corrected
baseline, a reader's SEG); the map fits (IVIM, DKI, DCE) dominate the chain's time and depend only
on the instances fed to :func:`processing.maps.compute_maps`, the
:class:`processing.maps.MapSettings` and the algorithm version. The cache key covers exactly those:

* every input instance as ``(SOP Instance UID, SHA-256 of its content)``, sorted by UID. The content
  digest is that of the dataset as stored in the file it was read from (``Dataset.filename``; the
  store and ``analyze`` read every instance from disk): its transfer syntax and the bytes after
  the file meta information. The file meta information is left out because a receiver writes its
  own (its implementation UID and version, the sender's AE title): an instance sent by C-STORE
  keys as the file it was sent from (dcmtk's ``storescu`` and Orthanc pass the dataset's bytes on
  unchanged), so a shared cache folder serves ``analyze`` and the node alike. A file without file
  meta information is digested whole; a dataset built in memory (no file) from its encoding by
  :func:`pydicom.dcmwrite`. A corrected instance re-sent under the same SOP Instance UID
  therefore changes the key, and so does any added or withdrawn instance;
* every field of the map settings (``repr`` of each, sorted by name);
* :data:`node.__version__`.

An entry is two files named after the key: ``<key>.npz`` (``values`` and ``valid`` per quantity)
and ``<key>.json`` (unit, geometry, source series and provenance of each map, and the SHA-256 of
the ``.npz``). Both are written under temporary names and renamed; the JSON, renamed last, commits
the entry. The provenance is stored with a type-tagged JSON encoding (tuples, numpy scalars and
arrays, non-string dictionary keys) so that a cached map's provenance equals the computed one,
value for value and type for type: the summary and every output are the same as without the cache
(output UIDs do not depend on map values anyway). An unreadable, incomplete or inconsistent entry
is a miss, with a warning; a failure to write an entry is a warning too, never an analysis failure.

Results derived from several studies are kept beside the maps under keys of their own
(:func:`derived_key`): the baseline's per-case repeatability (``<key>.repeatability.json``,
numbers) and each follow-up's registration to the baseline with its lesion
(``<key>.followup_lesion.npz`` and ``.json``: the mask, the registration's fields, the notes;
:meth:`MapCache.put_entry`), so a re-analysis after a new follow-up computes only what involves
the new study.

The cache is unbounded: entries are a few MB per study (float32 maps of the source grids);
:meth:`MapCache.prune` removes the least recently used entries above a size when asked to.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import struct
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from stat import S_ISREG
from typing import Any

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset

from node import __version__
from processing.maps import MapSettings, QuantMap
from processing.series import Geometry

logger = logging.getLogger(__name__)

#: format of the stored entries; bump when the layout changes (old entries become misses)
CACHE_FORMAT = 2
_CHUNK = 1 << 20
_META_PROBE = 144  # preamble, DICM, the File Meta Information Group Length element


class MapCacheError(Exception):
    """A cache entry cannot be encoded (e.g. a provenance value of an unsupported type)."""


def instance_digest(ds: Dataset) -> str:
    """SHA-256 of one instance's content: when it was read from a file, its dataset as stored there
    (transfer syntax and the bytes after the file meta information; the whole file if it has no
    file meta information), else its DICOM encoding.

    A file's digest is kept on the dataset with the file's path, modification time and size,
    and reused while they are unchanged: one analysis keys the same instances several times
    (the baseline's anatomical series for its repeatability and again for each follow-up's
    lesion), and each time would read the files again.
    """
    filename = getattr(ds, "filename", None)
    stat = None
    if isinstance(filename, (str, os.PathLike)):
        with contextlib.suppress(OSError):
            stat = os.stat(filename)
    if stat is not None and S_ISREG(stat.st_mode):
        stamp = (os.fspath(filename), stat.st_mtime_ns, stat.st_size)
        memo = ds.__dict__.get("_content_digest")  # beside pydicom's elements, not one of them
        if memo is not None and memo[0] == stamp:
            return str(memo[1])
        digest = hashlib.sha256()
        with open(filename, "rb") as fh:
            start = _dataset_offset(fh.read(_META_PROBE))
            if start is None:
                digest.update(b"file\n")
                fh.seek(0)
            else:
                meta = getattr(ds, "file_meta", None)
                syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
                digest.update(f"dataset {syntax}\n".encode())
                fh.seek(start)
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                digest.update(chunk)
        ds.__dict__["_content_digest"] = (stamp, digest.hexdigest())
        return digest.hexdigest()
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=False)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def _dataset_offset(head: bytes) -> int | None:
    """Where the dataset starts in a DICOM file that begins with ``head``: after the preamble,
    ``DICM`` and the file meta information, whose length its first element (File Meta Information
    Group Length, explicit VR little endian, PS3.10 7.1) gives; ``None`` when the file does not
    start that way."""
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        return None
    (length,) = struct.unpack_from("<H", head, 138)
    if length != 4:
        return None
    (group_length,) = struct.unpack_from("<I", head, 140)
    return 144 + group_length


def cache_key(datasets: Sequence[Dataset], settings: MapSettings | None) -> str:
    """The key of the maps computed from `datasets` with `settings` (see the module docstring)."""
    settings = settings or MapSettings()
    digest = hashlib.sha256()
    digest.update(f"map-cache/{CACHE_FORMAT}/{__version__}\n".encode())
    for uid, content in sorted((str(ds.SOPInstanceUID), instance_digest(ds)) for ds in datasets):
        digest.update(f"{uid}:{content}\n".encode())
    settings_text = repr(
        sorted((f.name, repr(getattr(settings, f.name))) for f in fields(settings))
    )
    digest.update(settings_text.encode())
    return digest.hexdigest()


def derived_key(kind: str, datasets: Sequence[Dataset], *parts: str | bytes) -> str:
    """The key of a result derived from `datasets` and `parts` (e.g. the baseline's per-case
    repeatability: its instances, the lesion mask and the radiomics settings), of type `kind`.

    Like :func:`cache_key`: every instance by UID and content digest, then each part
    (length-prefixed, so that parts cannot run into each other), the cache format and
    :data:`node.__version__`.
    """
    digest = hashlib.sha256()
    digest.update(f"{kind}/{CACHE_FORMAT}/{__version__}\n".encode())
    unique = {str(ds.SOPInstanceUID): ds for ds in datasets}
    for uid, ds in sorted(unique.items()):
        digest.update(f"{uid}:{instance_digest(ds)}\n".encode())
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(f"{len(data)}:".encode())
        digest.update(data)
    return digest.hexdigest()


def _encode(value: Any) -> Any:
    """A JSON-able form of `value` that :func:`_decode` turns back into an equal value of the same
    types."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)) and type(value) in (int, float):
        if isinstance(value, float) and not np.isfinite(value):
            return {"__float__": repr(value)}
        return value
    if isinstance(value, np.generic):
        return {"__np__": value.dtype.str, "v": _encode(value.item())}
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise MapCacheError("object arrays in a map provenance cannot be cached")
        return {
            "__ndarray__": value.dtype.str,
            "shape": list(value.shape),
            "v": [_encode(v) for v in value.ravel().tolist()],
        }
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        if all(type(k) is str for k in value) and not any(k.startswith("__") for k in value):
            return {k: _encode(v) for k, v in value.items()}
        return {"__dict__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    raise MapCacheError(f"a map provenance value of type {type(value).__name__} cannot be cached")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__float__" in value:
        return float(value["__float__"])
    if "__np__" in value:
        return np.dtype(value["__np__"]).type(_decode(value["v"]))
    if "__ndarray__" in value:
        return np.asarray(
            [_decode(v) for v in value["v"]], dtype=np.dtype(value["__ndarray__"])
        ).reshape(value["shape"])
    if "__tuple__" in value:
        return tuple(_decode(v) for v in value["__tuple__"])
    if "__dict__" in value:
        return {_decode(k): _decode(v) for k, v in value["__dict__"]}
    return {k: _decode(v) for k, v in value.items()}


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same types, NaN equal to NaN (what the cache must preserve)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
        )
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (float, np.floating)) and np.isnan(a):
        return bool(np.isnan(b))
    return bool(a == b)


def _checked_description(path: Path, key: str, kind: str | None) -> dict[str, Any]:
    """An entry's JSON description, checked to be of this cache format, key and kind (None for
    a study's maps).

    Raises
    ------
    MapCacheError, OSError, ValueError
    """
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
        raise MapCacheError("entry of another format or key")
    if meta.get("kind") != kind:
        raise MapCacheError(f"entry of kind {meta.get('kind')!r}")
    return dict(meta)


def _unreadable(kind: str, key: str, err: Exception) -> None:
    logger.warning(
        "cached %s %s unreadable (%s: %s); recomputed", kind, key[:16], type(err).__name__, err
    )


class MapCache:
    """Computed maps of studies, on disk under `root`, keyed by :func:`cache_key`.

    Parameters
    ----------
    root : Path
        Folder of the entries (created on the first write).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _paths(self, key: str) -> tuple[Path, Path]:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a map cache key: {key!r}")
        return self.root / f"{key}.npz", self.root / f"{key}.json"

    def get(self, key: str) -> dict[str, QuantMap] | None:
        """The maps stored under `key`, or None (absent, unreadable or inconsistent: a miss)."""
        npz_path, json_path = self._paths(key)
        if not json_path.is_file():
            return None
        try:
            meta, arrays = self._read_entry(npz_path, json_path, key, None)
            maps: dict[str, QuantMap] = {}
            for i, item in enumerate(meta["maps"]):
                values = arrays[f"values_{i}"]
                valid = arrays[f"valid_{i}"]
                geom = item["geometry"]
                geometry = Geometry(
                    origin=tuple(float(v) for v in geom["origin"]),
                    spacing=tuple(float(v) for v in geom["spacing"]),
                    direction=tuple(float(v) for v in geom["direction"]),
                    size=tuple(int(v) for v in geom["size"]),
                )
                if (
                    values.dtype != np.float32
                    or valid.dtype != np.bool_
                    or values.shape != valid.shape
                    or values.shape != tuple(reversed(geometry.size))
                ):
                    raise MapCacheError(f"map {item['quantity']} has inconsistent arrays")
                maps[item["quantity"]] = QuantMap(
                    quantity=item["quantity"],
                    values=values,
                    valid=valid,
                    unit=item["unit"],
                    geometry=geometry,
                    source_series_instance_uid=item["source_series_instance_uid"],
                    provenance=_decode(item["provenance"]),
                )
            return maps
        except (OSError, ValueError, KeyError, TypeError, IndexError, MapCacheError) as err:
            # zipfile.BadZipFile and json.JSONDecodeError are ValueError/OSError subclasses
            logger.warning(
                "map cache entry %s unreadable (%s: %s); maps are recomputed",
                key[:16],
                type(err).__name__,
                err,
            )
            return None

    def put(self, key: str, maps: Mapping[str, QuantMap]) -> bool:
        """Store `maps` under `key`; False (with a warning) when they cannot be stored."""
        npz_path, json_path = self._paths(key)
        try:
            items, arrays = [], {}
            for i, (quantity, qmap) in enumerate(sorted(maps.items())):
                provenance = _encode(qmap.provenance)
                if not _same(_decode(json.loads(json.dumps(provenance))), qmap.provenance):
                    raise MapCacheError(f"the provenance of map {quantity} does not round-trip")
                geometry = qmap.geometry
                items.append(
                    {
                        "quantity": quantity,
                        "unit": qmap.unit,
                        "geometry": {
                            "origin": list(geometry.origin),
                            "spacing": list(geometry.spacing),
                            "direction": list(geometry.direction),
                            "size": list(geometry.size),
                        },
                        "source_series_instance_uid": qmap.source_series_instance_uid,
                        "provenance": provenance,
                    }
                )
                arrays[f"values_{i}"] = np.asarray(qmap.values, dtype=np.float32)
                arrays[f"valid_{i}"] = np.asarray(qmap.valid, dtype=np.bool_)
            self._write_entry(npz_path, json_path, arrays, {"key": key, "maps": items})
            return True
        except (OSError, ValueError, TypeError, MapCacheError) as err:
            logger.warning("maps not cached (entry %s): %s: %s", key[:16], type(err).__name__, err)
            return False

    def get_values(self, kind: str, key: str) -> dict[str, float] | None:
        """Named numbers of type `kind` stored under `key` (:meth:`put_values`), or None."""
        path = self._paths(key)[1].with_suffix(f".{kind}.json")
        if not path.is_file():
            return None
        try:
            meta = _checked_description(path, key, kind)
            return {str(name): float(value) for name, value in meta["values"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, MapCacheError) as err:
            _unreadable(kind, key, err)
            return None

    def put_values(self, kind: str, key: str, values: Mapping[str, float]) -> bool:
        """Store named numbers of type `kind` under `key`; False (with a warning) on failure."""
        path = self._paths(key)[1].with_suffix(f".{kind}.json")
        meta = {
            "format": CACHE_FORMAT,
            "key": key,
            "kind": kind,
            "algorithm_version": __version__,
            "values": {name: float(value) for name, value in values.items()},
        }
        try:
            data = json.dumps(meta, allow_nan=False, sort_keys=True).encode("utf-8")
            self.root.mkdir(parents=True, exist_ok=True)
            self._write_atomic(path, data)
            return True
        except (OSError, ValueError, TypeError) as err:
            logger.warning(
                "%s not cached (entry %s): %s: %s", kind, key[:16], type(err).__name__, err
            )
            return False

    def get_entry(self, kind: str, key: str) -> tuple[Any, dict[str, np.ndarray]] | None:
        """A derived result of type `kind` stored under `key` (:meth:`put_entry`): its
        description and its arrays, or None (absent, unreadable or inconsistent: a miss)."""
        npz_path, json_path = self._entry_paths(kind, key)
        if not json_path.is_file():
            return None
        try:
            meta, arrays = self._read_entry(npz_path, json_path, key, kind)
            return _decode(meta["description"]), arrays
        except (OSError, ValueError, KeyError, TypeError, IndexError, MapCacheError) as err:
            _unreadable(kind, key, err)
            return None

    def put_entry(
        self, kind: str, key: str, description: Any, arrays: Mapping[str, np.ndarray]
    ) -> bool:
        """Store a derived result of type `kind` under `key`: a description (JSON with the
        type-tagged encoding of the map provenance: it comes back equal, type for type) and
        named arrays. The description, written last, commits the entry. False (with a
        warning) when it cannot be stored."""
        npz_path, json_path = self._entry_paths(kind, key)
        try:
            encoded = _encode(description)
            if not _same(_decode(json.loads(json.dumps(encoded))), description):
                raise MapCacheError(f"the {kind} description does not round-trip")
            self._write_entry(
                npz_path,
                json_path,
                {name: np.asarray(a) for name, a in arrays.items()},
                {"key": key, "kind": kind, "description": encoded},
            )
            return True
        except (OSError, ValueError, TypeError, MapCacheError) as err:
            logger.warning(
                "%s not cached (entry %s): %s: %s", kind, key[:16], type(err).__name__, err
            )
            return False

    def _entry_paths(self, kind: str, key: str) -> tuple[Path, Path]:
        if not kind.isidentifier():
            raise ValueError(f"not a cache entry kind: {kind!r}")
        npz_path, json_path = self._paths(key)
        return npz_path.with_suffix(f".{kind}.npz"), json_path.with_suffix(f".{kind}.json")

    def _write_entry(
        self, npz_path: Path, json_path: Path, arrays: Mapping[str, np.ndarray], fields: dict
    ) -> None:
        """Write an entry: the arrays (``.npz``), then its description (``.json``: ``fields``
        with the cache format, the node version and the arrays' SHA-256), which commits it."""
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        data = buffer.getvalue()
        meta = {
            "format": CACHE_FORMAT,
            "algorithm_version": __version__,
            "npz_sha256": hashlib.sha256(data).hexdigest(),
            **fields,
        }
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_atomic(npz_path, data)
        self._write_atomic(json_path, json.dumps(meta, allow_nan=False).encode("utf-8"))

    @staticmethod
    def _read_entry(
        npz_path: Path, json_path: Path, key: str, kind: str | None
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """An entry's description and arrays, checked against its format, key, kind and the
        arrays' SHA-256.

        Raises
        ------
        MapCacheError, OSError, ValueError, KeyError
            The entry is not one of this key, or damaged.
        """
        meta = _checked_description(json_path, key, kind)
        data = npz_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["npz_sha256"]:
            raise MapCacheError("array file does not match its description")
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        return meta, arrays

    def _write_atomic(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def prune(self, max_bytes: int) -> int:
        """Remove the least recently written entries until the cache holds at most `max_bytes`;
        return how many entries were removed."""
        entries = []
        for json_path in self.root.glob("*.json"):
            npz_path = json_path.with_suffix(".npz")
            try:
                size = json_path.stat().st_size + (
                    npz_path.stat().st_size if npz_path.exists() else 0
                )
                entries.append((json_path.stat().st_mtime, size, json_path, npz_path))
            except OSError:
                continue
        total = sum(e[1] for e in entries)
        removed = 0
        for _, size, json_path, npz_path in sorted(entries):
            if total <= max_bytes:
                break
            json_path.unlink(missing_ok=True)  # the commit point first: never a half entry
            npz_path.unlink(missing_ok=True)
            total -= size
            removed += 1
        return removed
