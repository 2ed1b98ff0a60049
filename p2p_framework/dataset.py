"""Edit datasets: many items, many samples each, scored, filtered and written to Parquet shards,
resumable and exactly once (``p2p-run dataset``; docs/dataset.md).

A *spec* (TOML, :func:`load_dataset_spec`) names the model, the items file (JSONL or CSV: a
source prompt, targets, optionally a photo or a saved inversion, and any job key), the job
every sample runs (edits and sources by plugin name, as in pipeline files), how many samples
per item, the ranges each sample draws its settings from, and the filters.

The work is the same in one process and on Ray (:func:`run_dataset`):

- every sample has a deterministic key (``ITEM-KEY/SAMPLE``) and draws its values from a
  generator seeded with the spec's ``seed``, the item's key and the sample's index, so the
  same spec gives the same dataset on any number of workers, in any order;
- a :class:`DatasetWorker` holds one loaded model and turns an item into its sample rows: all
  its samples run in UNet batches of their own (:func:`~p2p_framework.pipeline.iter_edits`,
  no other item's samples, so a sample's pixels do not depend on which worker ran it), are
  scored by the filters and ranked; a sample that fails is a row with its error. Ray Data's
  ``map_batches`` calls it over a pool of actors; without Ray the driver calls it in a loop;
- the driver alone writes: when an item's rows are all in, it joins the current shard; a full
  shard is written to a temporary name and renamed, then one line appended to
  ``manifest.jsonl`` commits the shard and its items' outcomes. A rerun reads the manifest,
  drops what no line commits (a shard renamed just before a kill, a torn last line) and runs
  only the items it lacks. Rows Ray delivers twice (a retried task) are dropped by key.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import os
import random
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import P2PError
from .outputs import (
    OutputError,
    _block_signals,
    _fsync_dir,
    folder_lock,
    json_ready,
    png_bytes,
    write_bytes_atomic,
)
from .pipeline_file import read_toml
from .registry import PluginRegistry, get_registry
from .spec import JobError, job_keys, spec_from_job

#: ``format`` of the manifest's first line.
DATASET_FORMAT = "p2p-framework/dataset@1"
#: Keys of a dataset spec's top level.
SPEC_KEYS = (
    "model",
    "revision",
    "device",
    "dtype",
    "items",
    "samples_per_item",
    "keep",
    "rank",
    "seed",
    "shard_size",
    "batch_rows",
    "job",
    "sample",
    "filters",
)
#: Item keys that say what an item is; any other key of an item is a job key of its samples.
ITEM_KEYS = ("id", "prompt", "target", "targets", "image", "inversion")
#: Where the Ray extra is described, for messages.
RAY_HINT = "pip install 'p2p-framework[ray]' (docs/dataset.md)"

#: Job keys that only the spec's top level sets: a worker holds one model.
MODEL_KEYS = ("model", "revision", "device", "dtype", "compile")
#: Most Ray Data blocks the items are cut into (one item per block below this).
MAX_BLOCKS = 10_000

MANIFEST = "manifest.jsonl"
SHARDS = "shards"


class DatasetError(JobError):
    """A dataset spec, items file or output folder that cannot be used (the message says why)."""


def _need_pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DatasetError(
            "p2p-run dataset writes Parquet and needs pyarrow: pip install "
            "'p2p-framework[dataset]' (or [ray], which brings it)"
        ) from None
    return pyarrow


# -- the spec -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Draw:
    """How one sampled key gets its value: ``low..high`` (uniform; whole numbers when both
    are), or one of ``choices`` (uniform)."""

    low: Any = None
    high: Any = None
    choices: tuple[Any, ...] = ()

    @classmethod
    def parse(cls, key: str, value: Any) -> Draw:
        """``[low, high]`` or ``{choice = [...]}``; anything else is refused."""
        if isinstance(value, Mapping) and set(value) == {"choice"}:
            choices = value["choice"]
            if not isinstance(choices, list) or not choices:
                raise DatasetError(f"sample.{key}: choice needs a non-empty list")
            return cls(choices=tuple(choices))
        if (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ):
            low, high = value
            if low > high:
                raise DatasetError(f"sample.{key}: the range [{low}, {high}] is empty")
            return cls(low, high)
        raise DatasetError(
            f"sample.{key}: expected a range [low, high] or {{ choice = [...] }}, got {value!r} "
            "(a fixed value belongs in [job])"
        )

    def draw(self, rng: random.Random) -> Any:
        """One value."""
        if self.choices:
            return self.choices[rng.randrange(len(self.choices))]
        if isinstance(self.low, int) and isinstance(self.high, int):
            return rng.randint(self.low, self.high)
        return rng.uniform(float(self.low), float(self.high))

    def to_json(self) -> Any:
        return {"choice": list(self.choices)} if self.choices else [self.low, self.high]


#: The seeds a sample draws when the spec's ``[sample]`` has no ``seed``.
DEFAULT_SEEDS = Draw(0, 2**31 - 1)


@dataclass
class DatasetSpec:
    """A dataset spec, checked (format in docs/dataset.md).

    Attributes:
        path: the spec file.
        items: the items file (JSONL or CSV), absolute.
        samples_per_item: samples run per item.
        keep: keep at most this many accepted samples per item, the best by ``rank``
            (None: every accepted one).
        rank: the filter whose score ranks samples for ``keep`` (default: the first).
        seed: seeds every sample's generator, with the item's key and the sample's index.
        shard_size: kept samples per shard (a shard ends at an item's boundary).
        batch_rows: most UNet rows per batch of one item's samples (``"auto"``: 16 on a
            GPU, 1 on the CPU, see :data:`p2p_framework.runner.AUTO_BATCH_ROWS`).
        job: the job every sample runs, in the pipeline-file vocabulary.
        sample: the job keys each sample draws, ``key -> Draw`` (``PLUGIN.OPTION`` keys set
            a plugin option).
        filters: ``[(name, options)]``, in order.
        model, revision, device, dtype: the model, as in a pipeline file.
    """

    path: Path
    items: Path
    samples_per_item: int = 1
    keep: int | None = None
    rank: str | None = None
    seed: int = 0
    shard_size: int = 256
    batch_rows: int | str = "auto"
    job: dict[str, Any] = field(default_factory=dict)
    sample: dict[str, Draw] = field(default_factory=dict)
    filters: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    model: str | None = None
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"

    def to_json(self) -> dict[str, Any]:
        """What decides the samples, JSON-ready (the manifest records it; its hash is the
        :meth:`fingerprint`). The items file is not part of it: items can be added."""
        return json_ready(
            {
                "samples_per_item": self.samples_per_item,
                "keep": self.keep,
                "rank": self.rank,
                "seed": self.seed,
                "job": self.job,
                "sample": {k: v.to_json() for k, v in self.sample.items()},
                "filters": [{"name": n, **o} for n, o in self.filters],
                "model": self.model,
                "revision": self.revision,
                "device": self.device,
                "dtype": self.dtype,
            }
        )

    def fingerprint(self) -> str:
        """Hash of :meth:`to_json`: a rerun into the same folder must have the same one."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _positive_int(data: Mapping[str, Any], key: str, default: Any) -> Any:
    value = data.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DatasetError(f"{key} must be a positive whole number, got {value!r}")
    return value


def load_dataset_spec(
    path: str | os.PathLike[str], registry: PluginRegistry | None = None
) -> DatasetSpec:
    """Read and check a dataset spec: its keys, draws, job keys and filters (built once to
    validate their options). Paths are relative to the spec file.

    Raises:
        DatasetError: unreadable, not TOML, unknown keys, bad values.
        PluginError, OptionError: an unknown filter or a bad filter option.
    """
    registry = registry if registry is not None else get_registry()
    path = Path(path)
    data = read_toml(path, "dataset spec", DatasetError)
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise DatasetError(
            f"{path.name}: unknown key(s) {', '.join(unknown)}; expected: {', '.join(SPEC_KEYS)}"
        )
    if not isinstance(data.get("items"), str):
        raise DatasetError(f'{path.name}: give the items file (items = "items.jsonl")')
    job = data.get("job", {})
    sample = data.get("sample", {})
    if not isinstance(job, dict) or not isinstance(sample, dict):
        raise DatasetError(f"{path.name}: [job] and [sample] must be tables")
    accepted = set(job_keys(registry))
    given = ("prompt", "targets", "target", "name", "out", *MODEL_KEYS)
    bad = sorted(k for k in job if k not in accepted or k in given)
    if bad:
        raise DatasetError(
            f"{path.name}: [job] key(s) {', '.join(bad)} are not job keys a dataset sets "
            "(prompts come from the items file, the model from the top level)"
        )
    draws = {}
    for key, value in sample.items():
        if "." not in key and key not in accepted:
            raise DatasetError(f"{path.name}: sample.{key} is not a job key or PLUGIN.OPTION")
        draws[key] = Draw.parse(key, value)
    filters = []
    for entry in data.get("filters", []):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise DatasetError(f'{path.name}: each [[filters]] needs name = "FILTER"')
        options = {k: v for k, v in entry.items() if k != "name"}
        registry.build("filter", entry["name"], options)  # validates now, not in a worker
        filters.append((entry["name"], options))
    rank = data.get("rank")
    if rank is not None and rank not in [name for name, _ in filters]:
        raise DatasetError(f"{path.name}: rank = {rank!r} is not one of the [[filters]]")
    batch_rows = data.get("batch_rows", "auto")
    if batch_rows != "auto":
        batch_rows = _positive_int(data, "batch_rows", None)
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise DatasetError(f"seed must be a whole number >= 0, got {seed!r}")
    return DatasetSpec(
        path=path,
        items=(path.parent / data["items"]).resolve(),
        samples_per_item=_positive_int(data, "samples_per_item", 1),
        keep=_positive_int(data, "keep", None),
        rank=rank,
        seed=seed,
        shard_size=_positive_int(data, "shard_size", 256),
        batch_rows=batch_rows,
        job=dict(job),
        sample=draws,
        filters=filters,
        model=data.get("model"),
        revision=data.get("revision"),
        device=str(data.get("device") or "auto"),
        dtype=str(data.get("dtype") or "auto"),
    )


# -- items and samples ----------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One line of the items file.

    Attributes:
        key: its ``id``, else a hash of its content (so adding or reordering items keeps
            every other item's key, and its samples).
        job: its job keys (``prompt``, ``targets``, ``image``... paths made absolute).
        line: its line (JSONL) or row (CSV) in the file, 1-based, for messages.
    """

    key: str
    job: dict[str, Any]
    line: int = 0

    def sample_key(self, index: int) -> str:
        """The key of sample ``index``: ``ITEM-KEY/NNNN``."""
        return f"{self.key}/{index:04d}"


def _item(fields: dict[str, Any], line: int, base: Path, where: str) -> Item:
    fields = {k: v for k, v in fields.items() if v not in (None, "")}
    if "target" in fields and "targets" not in fields:
        fields["targets"] = [fields.pop("target")]
    targets = fields.get("targets")
    if isinstance(targets, str):  # CSV: several targets separated by "|"
        targets = fields["targets"] = [t.strip() for t in targets.split("|") if t.strip()]
    if not fields.get("prompt") and not fields.get("inversion"):
        raise DatasetError(f"{where}: an item needs a prompt (or an inversion)")
    if not targets:
        raise DatasetError(f"{where}: an item needs a target (or targets)")
    for key in ("image", "inversion"):
        if key in fields:
            fields[key] = str((base / str(fields[key])).resolve())
    key = fields.pop("id", None)
    if key is None:
        text = json.dumps(fields, sort_keys=True, ensure_ascii=False)
        key = hashlib.sha256(text.encode()).hexdigest()[:12]
    key = str(key)
    if not key or "/" in key:
        raise DatasetError(f"{where}: id must be non-empty text without '/', got {key!r}")
    return Item(key, fields, line)


def read_items(path: str | os.PathLike[str]) -> list[Item]:
    """The items of a JSONL file (one object per line) or a CSV file (a header row; columns
    ``id, prompt, target`` or ``targets`` (several split by ``|``), ``image``, ``inversion``,
    and any job key). Photo and inversion paths are relative to the file.

    Raises:
        DatasetError: unreadable file, a bad line, no items, two items with one key.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise DatasetError(
            f"cannot read items file {str(path)!r}: {error.strerror or error}"
        ) from None
    items = []
    if path.suffix.lower() == ".csv":
        for row, fields in enumerate(csv.DictReader(io.StringIO(text)), start=2):
            items.append(_item(dict(fields), row, path.parent, f"{path.name} row {row}"))
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                fields = json.loads(line)
            except ValueError as error:
                raise DatasetError(f"{where} is not JSON: {error}") from None
            if not isinstance(fields, dict):
                raise DatasetError(f"{where}: expected a JSON object")
            items.append(_item(fields, number, path.parent, where))
    if not items:
        raise DatasetError(f"items file {str(path)!r} holds no items")
    seen: dict[str, int] = {}
    for item in items:
        if item.key in seen:
            raise DatasetError(
                f"{path.name}: items at lines {seen[item.key]} and {item.line} have the same "
                f"key {item.key!r} (same id, or same content)"
            )
        seen[item.key] = item.line
    return items


def sample_values(spec: DatasetSpec, item: Item, index: int) -> dict[str, Any]:
    """The values sample ``index`` of ``item`` draws (its ``[sample]`` keys and ``seed``):
    from a generator seeded with the spec's seed, the item's key and the index only."""
    digest = hashlib.sha256(f"{spec.seed}\0{item.key}\0{index}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    draws = dict(spec.sample)
    draws.setdefault("seed", DEFAULT_SEEDS)
    return {key: draws[key].draw(rng) for key in sorted(draws)}


def sample_job(
    spec: DatasetSpec, item: Item, values: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The job of one sample, and its defaults (for
    :func:`~p2p_framework.spec.spec_from_job`): the spec's ``[job]``, the item's keys, then
    the drawn values (``PLUGIN.OPTION`` ones as ``set`` entries). A ``seed`` the spec does
    not draw is a default, which a source without a seed (a photo's) ignores."""
    job = {**spec.job, **item.job}
    defaults = {}
    if "seed" not in spec.sample:
        values = dict(values)
        defaults["seed"] = values.pop("seed", None)
    sets = job.get("set") or {}
    if isinstance(sets, Mapping):
        sets = {plugin: dict(options) for plugin, options in sets.items()}
    else:
        sets = list(sets) if isinstance(sets, (list, tuple)) else [sets]
    for key, value in values.items():
        if "." in key:
            plugin, option = key.rsplit(".", 1)
            if isinstance(sets, dict):
                sets.setdefault(plugin, {})[option] = value
            else:
                sets.append(f"{plugin}.{option}={json.dumps(value)}")
        else:
            job[key] = value
    if sets:
        job["set"] = sets
    job.update(model=spec.model, revision=spec.revision, device=spec.device, dtype=spec.dtype)
    return job, defaults


def check_items(items: Sequence[Item], registry: PluginRegistry, where: str) -> None:
    """Refuse items with keys that are not job keys, or that name a model (a worker holds
    the spec's model only)."""
    accepted = set(job_keys(registry)) - set(MODEL_KEYS)
    for item in items:
        bad = sorted(set(item.job) - accepted)
        if bad:
            raise DatasetError(
                f"{where} line {item.line}: unknown item key(s) {', '.join(bad)}; an item "
                "gives prompt, target(s), image, inversion, id and job keys such as blend"
            )


# -- the worker -----------------------------------------------------------------------------

#: Columns of a shard (and of the rows a worker returns, which add ``status``, ``error``,
#: ``worker`` and ``seconds``).
SHARD_COLUMNS = (
    "key",
    "item",
    "sample",
    "prompt",
    "targets",
    "source_image",
    "target_images",
    "params",
    "scores",
    "rank",
    "run",
)


def _row_schema() -> Any:
    pa = _need_pyarrow()
    return pa.schema(
        [
            ("key", pa.string()),
            ("item", pa.string()),
            ("sample", pa.int32()),
            ("prompt", pa.string()),
            ("targets", pa.list_(pa.string())),
            ("source_image", pa.binary()),
            ("target_images", pa.list_(pa.binary())),
            ("params", pa.string()),
            ("scores", pa.map_(pa.string(), pa.float64())),
            ("rank", pa.int32()),
            ("run", pa.string()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("worker", pa.string()),
            ("seconds", pa.float64()),
        ]
    )


def _changed_tokens(tokenizer: Any, source: str, target: str) -> list[int]:
    from .prompts import token_ids

    known = set(token_ids(tokenizer, source))
    ids = token_ids(tokenizer, target)
    return [i for i, token in enumerate(ids[1:-1], start=1) if token not in known]


class DatasetWorker:
    """Holds one loaded model and turns items into sample rows (every sample of an item:
    kept, dropped by the filters, or failed with its error).

    Ray Data's ``map_batches`` calls it (one per actor); the one-process path calls it the
    same way. The batch is ``{"item": [JSON of an Item, ...]}``; the answer a
    ``pyarrow.Table`` of rows.

    Args:
        spec: the dataset spec.
        threads: CPU threads for PyTorch (None: leave as is).
        loader: ``loader(model, device=, dtype=, revision=, compile=)`` (default
            :func:`~p2p_framework.load_model`).
        registry: where plugins are found (default: the process's
            :func:`~p2p_framework.get_registry`, which a Ray actor always uses).
    """

    def __init__(
        self,
        spec: DatasetSpec,
        *,
        threads: int | None = None,
        loader: Callable[..., Any] | None = None,
        registry: PluginRegistry | None = None,
    ) -> None:
        from .model import load_model
        from .runner import AUTO_BATCH_ROWS

        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        self.spec = spec
        self.registry = registry if registry is not None else get_registry()
        self.filters = [self.registry.build("filter", n, o) for n, o in spec.filters]
        from .runner import model_from_env

        # One model per worker: the spec's (neither [job] nor an item may name another).
        self.model = (loader or load_model)(
            model_from_env(spec.model),
            device=spec.device,
            dtype=spec.dtype,
            revision=spec.revision,
            compile=False,
        )
        rows = spec.batch_rows
        if rows == "auto":
            rows = AUTO_BATCH_ROWS.get(self.model.device.type, AUTO_BATCH_ROWS["cpu"])
        self.batch_rows = int(rows)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: Mapping[str, Any]) -> Any:
        pa = _need_pyarrow()
        rows = []
        for text in batch["item"]:
            data = json.loads(str(text))
            rows += self.run_item(Item(data["key"], data["job"], data.get("line", 0)))
        return pa.Table.from_pylist(rows, schema=_row_schema())

    def run_item(self, item: Item) -> list[dict[str, Any]]:
        """Run, score and rank every sample of ``item``; one row per sample."""
        from .pipeline import EditJob, iter_edits

        began = time.perf_counter()
        spec = self.spec
        rows: dict[int, dict[str, Any]] = {}
        jobs, specs, indices = [], [], []
        needs_attention = any(f.needs_attention for f in self.filters)
        for index in range(spec.samples_per_item):
            values = sample_values(spec, item, index)
            row = self._row(item, index, values)
            rows[index] = row
            try:
                job, defaults = sample_job(spec, item, values)
                run = spec_from_job(job, self.registry, defaults=defaults)
            except (P2PError, OSError) as error:
                row.update(status="failed", error=_error_text(error))
                continue
            if needs_attention:
                run.settings = dataclasses.replace(run.settings, attention_maps=True)
            row["run"] = json.dumps(run.to_json(self.registry), ensure_ascii=False)
            jobs.append(EditJob(run.prompts, run.edits, run.source, run.settings))
            specs.append(run)
            indices.append(index)
        results = iter_edits(self.model, jobs, max_batch_rows=self.batch_rows, errors="return")
        for position, result in results:
            row = rows[indices[position]]
            if isinstance(result, BaseException):
                row.update(status="failed", error=_error_text(result))
                continue
            try:
                self._score(row, result)
            except Exception as error:  # a filter's bug fails this sample, not the dataset
                row.update(status="failed", error=f"filter: {_error_text(error)}")
        self._rank(list(rows.values()))
        seconds = (time.perf_counter() - began) / max(1, len(rows))
        for row in rows.values():
            row["seconds"] = seconds
        return [rows[index] for index in sorted(rows)]

    def _row(self, item: Item, index: int, values: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "key": item.sample_key(index),
            "item": item.key,
            "sample": index,
            "prompt": item.job.get("prompt"),
            "targets": list(item.job.get("targets", [])),
            "source_image": None,
            "target_images": None,
            "params": json.dumps(json_ready(dict(values)), sort_keys=True),
            "scores": [],
            "rank": None,
            "run": None,
            "status": "kept",
            "error": None,
            "worker": self.name,
            "seconds": 0.0,
        }

    def _score(self, row: dict[str, Any], result: Any) -> None:
        from .filters import EditPair, sample_scores

        maps = None
        if any(f.needs_attention for f in self.filters):
            store = result.attention_store
            maps = store.average(downscale=result.settings.attention_downscale, cross=True)
        pairs = [
            EditPair(
                result.prompts[0],
                result.prompts[i],
                result.images[0],
                result.images[i],
                i,
                _changed_tokens(self.model.tokenizer, result.prompts[0], result.prompts[i]),
                None if maps is None else maps[i].cpu(),
                result,
            )
            for i in range(1, len(result.images))
        ]
        scores, accepted = sample_scores(self.filters, pairs)
        row.update(
            prompt=result.prompts[0],
            targets=list(result.prompts[1:]),
            source_image=png_bytes(result.images[0]),
            target_images=[png_bytes(image) for image in result.images[1:]],
            scores=list(scores.items()),
            status="kept" if accepted else "dropped",
        )

    def _rank(self, rows: list[dict[str, Any]]) -> None:
        """Number the accepted samples best first (by the rank filter, ties by index) and
        drop those past ``keep``."""
        name = self.spec.rank or (self.spec.filters[0][0] if self.spec.filters else None)
        accepted = [row for row in rows if row["status"] == "kept"]

        def score(row: dict[str, Any]) -> float:
            value = dict(row["scores"]).get(name, 0.0) if name else 0.0
            return value if value == value else float("-inf")

        accepted.sort(key=lambda row: (-score(row), row["sample"]))
        for rank, row in enumerate(accepted):
            row["rank"] = rank
            if self.spec.keep is not None and rank >= self.spec.keep:
                row["status"] = "dropped"


def _error_text(error: BaseException) -> str:
    return str(error) if isinstance(error, P2PError) else f"{type(error).__name__}: {error}"


# -- the output folder ----------------------------------------------------------------------


@dataclass
class Manifest:
    """``manifest.jsonl``: a header line (format, fingerprint, spec), then one line per
    commit: ``{"shard": NAME or null, "rows": N, "items": {KEY: outcome}}``, where an outcome
    is ``{"kept": [...], "dropped": {KEY: scores}, "failed": {KEY: error}}``."""

    path: Path
    header: dict[str, Any] | None = None
    commits: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def read(cls, folder: Path, *, repair: bool = False) -> Manifest:
        """Read the committed lines. A torn last line (a kill mid-append) is ignored, and cut
        off with ``repair`` (only under the folder's lock)."""
        manifest = cls(folder / MANIFEST)
        try:
            data = manifest.path.read_bytes()
        except FileNotFoundError:
            return manifest
        good = 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                entry = json.loads(line)
            except ValueError:
                break
            if manifest.header is None:
                manifest.header = entry
            else:
                manifest.commits.append(entry)
            good += len(line)
        if repair and good < len(data):
            with open(manifest.path, "r+b") as file:
                file.truncate(good)
        return manifest

    def items(self) -> dict[str, dict[str, Any]]:
        """Every committed item's outcome."""
        return {k: v for c in self.commits for k, v in c.get("items", {}).items()}

    def shards(self) -> list[str]:
        """The committed shards' names, in order."""
        return [c["shard"] for c in self.commits if c.get("shard")]

    def append(self, entry: Mapping[str, Any]) -> None:
        """Append one line and fsync it: the commit point."""
        line = json.dumps(json_ready(entry), ensure_ascii=False, sort_keys=True) + "\n"
        with open(self.path, "ab") as file:
            file.write(line.encode("utf-8"))
            file.flush()
            os.fsync(file.fileno())
        if self.header is None:
            self.header = dict(entry)
        else:
            self.commits.append(dict(entry))


def _open_output(out: Path, spec: DatasetSpec) -> Manifest:
    """Check ``out`` (under its lock) and tidy it: a folder holding another spec's dataset
    or other files is refused; shards no manifest line commits and temporary files go."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output folder {str(out)!r} is a file")
    foreign = sorted(set(os.listdir(out)) - {MANIFEST, SHARDS}) if out.exists() else []
    if foreign:
        raise OutputError(
            f"output folder {str(out)!r} holds files that are not a dataset's "
            f"({', '.join(foreign[:3])}); choose a new or empty folder"
        )
    try:
        (out / SHARDS).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(
            f"cannot create output folder {str(out)!r}: {error.strerror or error}"
        ) from error
    manifest = Manifest.read(out, repair=True)
    if manifest.header is not None:
        if manifest.header.get("format") != DATASET_FORMAT:
            raise OutputError(f"{manifest.path} is not a p2p-run dataset manifest")
        if manifest.header.get("fingerprint") != spec.fingerprint():
            raise OutputError(
                f"output folder {str(out)!r} holds a dataset of another spec (the samples, "
                "job, filters or model differ); choose another --out"
            )
    committed = set(manifest.shards())
    for name in os.listdir(out / SHARDS):
        if name not in committed:  # renamed before a kill, or a temporary file
            (out / SHARDS / name).unlink()
    return manifest


class ShardWriter:
    """The driver's side: collects rows, writes whole items into shards and commits them.

    Args:
        out: the output folder (locked by the caller).
        spec: the dataset spec.
        manifest: the folder's manifest (:func:`_open_output`).
    """

    def __init__(self, out: Path, spec: DatasetSpec, manifest: Manifest) -> None:
        self.out, self.spec, self.manifest = out, spec, manifest
        self.seen: set[str] = set()
        self.partial: dict[str, dict[str, dict[str, Any]]] = {}
        self.rows: list[dict[str, Any]] = []
        self.outcomes: dict[str, dict[str, Any]] = {}
        self.shards_written = 0

    def add(self, row: dict[str, Any]) -> str | None:
        """Take one row; returns the item's key when this row completes it."""
        if row["key"] in self.seen:
            return None  # a retried Ray task delivered it again
        self.seen.add(row["key"])
        rows = self.partial.setdefault(row["item"], {})
        rows[row["key"]] = row
        if len(rows) < self.spec.samples_per_item:
            return None
        del self.partial[row["item"]]
        ordered = [rows[key] for key in sorted(rows)]
        outcome: dict[str, Any] = {"kept": [], "dropped": {}, "failed": {}}
        for sample in ordered:
            if sample["status"] == "kept":
                outcome["kept"].append(sample["key"])
                self.rows.append(sample)
            elif sample["status"] == "dropped":
                outcome["dropped"][sample["key"]] = dict(sample["scores"] or [])
            else:
                outcome["failed"][sample["key"]] = sample["error"]
        self.outcomes[row["item"]] = outcome
        if len(self.rows) >= self.spec.shard_size:
            self.commit()
        return row["item"]

    def commit(self) -> None:
        """Write the collected rows as one shard (through a temporary file and a rename,
        :func:`~p2p_framework.outputs.write_bytes_atomic`) and append the manifest line that
        commits it with its items' outcomes."""
        if not self.outcomes:
            return
        import pyarrow.parquet as pq

        pa = _need_pyarrow()
        # Only rows of finished items (an interrupt may fall between a row and its outcome).
        rows = [row for row in self.rows if row["item"] in self.outcomes]
        with _block_signals():  # the rename and the line that commits it are not split
            name = None
            if rows:
                name = f"shard-{len(self.manifest.shards()):05d}.parquet"
                table = pa.Table.from_pylist(
                    [{c: row[c] for c in SHARD_COLUMNS} for row in rows],
                    schema=pa.schema([_row_schema().field(c) for c in SHARD_COLUMNS]),
                )
                encoded = pa.BufferOutputStream()
                pq.write_table(table, encoded)
                data = encoded.getvalue().to_pybytes()
                final = write_bytes_atomic(self.out / SHARDS / name, data)
                _fsync_dir(final.parent)
                self.shards_written += 1
            self.manifest.append({"shard": name, "rows": len(rows), "items": self.outcomes})
        self.rows, self.outcomes = [], {}


# -- running --------------------------------------------------------------------------------


@dataclass
class DatasetProgress:
    """What the driver knows after each finished item (the ``on_item`` callback's argument).

    Attributes:
        items_done, items_total: items finished (this run and before) and in the file.
        samples: samples finished in this run; kept, dropped, failed: of those.
        seconds: since the work began (model loading and Ray's start included).
        workers: samples finished per worker (``host:pid``).
        busy: seconds each worker spent on its samples (running, scoring, encoding).
        item: the key of the item just finished.
    """

    items_done: int
    items_total: int
    samples: int = 0
    kept: int = 0
    dropped: int = 0
    failed: int = 0
    seconds: float = 0.0
    workers: dict[str, int] = field(default_factory=dict)
    busy: dict[str, float] = field(default_factory=dict)
    item: str | None = None

    @property
    def samples_per_minute(self) -> float:
        return 60.0 * self.samples / self.seconds if self.seconds > 0 else 0.0


@dataclass
class DatasetSummary:
    """The end of a :func:`run_dataset` call.

    Attributes:
        out: the output folder.
        engine: ``"process"`` (no Ray) or ``"ray"``.
        workers: how many workers were asked for.
        items_total, items_before, items_run: items in the file, committed before, run now.
        progress: the last :class:`DatasetProgress`.
        shards: shards written now; failed_before: samples failed in earlier runs.
    """

    out: Path
    engine: str
    workers: int
    items_total: int
    items_before: int
    items_run: int
    progress: DatasetProgress
    shards: int
    failed_before: int = 0

    def as_json(self) -> dict[str, Any]:
        p = self.progress
        return {
            "out": str(self.out),
            "engine": self.engine,
            "workers": self.workers,
            "items_total": self.items_total,
            "items_before": self.items_before,
            "items_run": self.items_run,
            "samples": p.samples,
            "kept": p.kept,
            "dropped": p.dropped,
            "failed": p.failed,
            "failed_before": self.failed_before,
            "shards_written": self.shards,
            "seconds": round(p.seconds, 3),
            "samples_per_minute": round(p.samples_per_minute, 3),
            "per_worker": dict(p.workers),
            "busy_seconds": {k: round(v, 3) for k, v in p.busy.items()},
        }


def _item_json(item: Item) -> str:
    return json.dumps({"key": item.key, "job": item.job, "line": item.line})


def _rows_in_process(
    spec: DatasetSpec,
    items: Sequence[Item],
    loader: Callable[..., Any] | None,
    registry: PluginRegistry | None,
) -> Iterator[dict[str, Any]]:
    """The one-process path: one :class:`DatasetWorker`, called item by item as Ray would."""
    from .signals import raise_pending

    worker = DatasetWorker(spec, loader=loader, registry=registry)
    for item in items:
        raise_pending()
        yield from worker({"item": [_item_json(item)]}).to_pylist()


def ray_available() -> bool:
    """Whether Ray (with Ray Data) can be imported."""
    try:
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


def _rows_on_ray(
    spec: DatasetSpec, items: Sequence[Item], workers: int, gpus_per_worker: float
) -> Iterator[dict[str, Any]]:
    """Ray Data: the items stream through ``map_batches`` over ``workers`` actors, each a
    :class:`DatasetWorker` (a model loaded once per actor), one item per call."""
    import ray

    # A CPU actor takes an equal share of the cluster's CPUs, at most one machine's.
    cpus = ray.cluster_resources().get("CPU", 1)
    largest = max(
        (n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=cpus
    )
    per_worker = max(1, int(min(cpus // max(1, workers), largest))) if not gpus_per_worker else 1
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # Small blocks: an actor's rows reach the driver (and are committed) block by block, and
    # a lost actor's block is what runs again.
    dataset = ray.data.from_items(
        [{"item": _item_json(item)} for item in items],
        override_num_blocks=min(len(items), MAX_BLOCKS),
    )
    dataset = dataset.map_batches(
        DatasetWorker,
        fn_constructor_kwargs={"spec": spec, "threads": None if gpus_per_worker else per_worker},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=per_worker if not gpus_per_worker else 1,
        num_gpus=gpus_per_worker or None,
        batch_format="numpy",
    )
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield from batch.to_pylist()
    except ray.exceptions.RayError as error:
        # A worker that cannot start (its model does not load) ends the run; Ray's error
        # holds the remote traceback as text: say the user's error in one line.
        found = re.findall(r"p2p_framework\.errors\.\w+: (.+)", str(error))
        if found:
            raise DatasetError(f"a Ray worker failed: {found[-1].strip()}") from error
        raise


@contextlib.contextmanager
def ray_session(address: str, workers: int) -> Iterator[None]:
    """Connect to Ray: ``local`` starts a private local cluster (stopped after), ``auto`` a
    running one named by ``RAY_ADDRESS`` or else a local one, anything else is a cluster's
    address (``ray start --head`` prints it). An already initialised Ray is used as it is."""
    try:
        import ray
    except ImportError:
        raise DatasetError(f"--ray {address} needs Ray: {RAY_HINT}") from None
    if ray.is_initialized():
        yield
        return
    # Ray's own INFO lines would drown the progress lines; warnings and errors still show.
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
    }
    if address == "local" or (address == "auto" and not os.environ.get("RAY_ADDRESS")):
        from .cpu_threads import usable_cores

        kwargs.update(address="local", num_cpus=max(workers, usable_cores()))
    else:
        kwargs["address"] = None if address == "auto" else address
    ray.init(**kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def run_dataset(
    spec: DatasetSpec,
    out: str | os.PathLike[str],
    *,
    ray: str = "auto",
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    on_item: Callable[[DatasetProgress], None] | None = None,
    on_start: Callable[[str, int, int], None] | None = None,
    loader: Callable[..., Any] | None = None,
    registry: PluginRegistry | None = None,
) -> DatasetSummary:
    """Run (or finish) a dataset into ``out``.

    Args:
        spec: from :func:`load_dataset_spec`.
        out: the output folder: ``manifest.jsonl`` and ``shards/``. A folder with this spec's
            dataset is finished (only the items it lacks run); another spec's is refused.
        ray: ``"off"`` (this process), ``"auto"`` (Ray if installed, else this process),
            ``"local"`` (a private local Ray), or a Ray cluster's address.
        workers: actors (each loads the model once); with Ray only.
        gpus_per_worker: GPUs per actor (0: CPU actors, each given an equal share of the
            cluster's CPUs as threads).
        on_item: called after each finished item with a :class:`DatasetProgress`.
        on_start: ``on_start(engine, items_to_run, items_total)`` before the work begins.
        loader: model loader of the one-process path (default
            :func:`~p2p_framework.load_model`).
        registry: plugins of the one-process path (Ray actors use their process's
            :func:`~p2p_framework.get_registry`: built-ins and installed packages).

    Raises:
        DatasetError, OutputError: bad items, a folder that holds another spec's dataset or
            is in use by another run. ``KeyboardInterrupt`` (Ctrl-C, SIGTERM) after the
            items finished so far are committed.
    """
    _need_pyarrow()
    out = Path(out)
    items = read_items(spec.items)
    check_items(items, registry if registry is not None else get_registry(), spec.items.name)
    engine = "process"
    if ray != "off" and (ray != "auto" or ray_available()):
        engine = "ray"
    with folder_lock(out):
        manifest = _open_output(out, spec)
        done = manifest.items()
        pending = [item for item in items if item.key not in done]
        failed_before = sum(len(o.get("failed", {})) for o in done.values())
        progress = DatasetProgress(
            items_done=sum(1 for item in items if item.key in done), items_total=len(items)
        )
        summary = DatasetSummary(
            out, engine, workers, len(items), progress.items_done, len(pending), progress, 0
        )
        summary.failed_before = failed_before
        if on_start is not None:
            on_start(engine, len(pending), len(items))
        if not pending:
            return summary
        if manifest.header is None:
            manifest.append(
                {
                    "format": DATASET_FORMAT,
                    "fingerprint": spec.fingerprint(),
                    "spec": spec.to_json(),
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                        timespec="seconds"
                    ),
                }
            )
        writer = ShardWriter(out, spec, manifest)
        began = time.perf_counter()
        try:
            with contextlib.ExitStack() as stack:
                if engine == "ray":
                    stack.enter_context(ray_session(ray, workers))
                    rows: Iterable[dict[str, Any]] = _rows_on_ray(
                        spec, pending, workers, gpus_per_worker
                    )
                else:
                    rows = _rows_in_process(spec, pending, loader, registry)
                for row in rows:
                    finished = writer.add(row)
                    _count(progress, row, finished, began)
                    if finished is not None and on_item is not None:
                        on_item(
                            dataclasses.replace(
                                progress, workers=dict(progress.workers), busy=dict(progress.busy)
                            )
                        )
        finally:
            writer.commit()  # what finished is kept, also on Ctrl-C or a failure
            summary.shards = writer.shards_written
        return summary


def _count(progress: DatasetProgress, row: Mapping[str, Any], item: str | None, began: float):
    progress.samples += 1
    status = str(row["status"])
    setattr(progress, status, getattr(progress, status) + 1)
    progress.workers[row["worker"]] = progress.workers.get(row["worker"], 0) + 1
    progress.busy[row["worker"]] = progress.busy.get(row["worker"], 0.0) + float(row["seconds"])
    progress.seconds = time.perf_counter() - began
    if item is not None:
        progress.items_done += 1
        progress.item = item


def read_dataset(out: str | os.PathLike[str]) -> Any:
    """Every kept sample of a dataset folder as one ``pyarrow.Table`` (the committed shards,
    in order; images are PNG bytes)."""
    pa = _need_pyarrow()
    import pyarrow.parquet as pq

    out = Path(out)
    names = Manifest.read(out).shards() if (out / MANIFEST).exists() else []
    tables = [pq.read_table(out / SHARDS / name) for name in names]
    if not tables:
        return pa.schema([_row_schema().field(c) for c in SHARD_COLUMNS]).empty_table()
    return pa.concat_tables(tables)


__all__ = [
    "DATASET_FORMAT",
    "DatasetError",
    "DatasetProgress",
    "DatasetSpec",
    "DatasetSummary",
    "DatasetWorker",
    "Draw",
    "Item",
    "Manifest",
    "ShardWriter",
    "load_dataset_spec",
    "ray_available",
    "ray_session",
    "read_dataset",
    "read_items",
    "run_dataset",
    "sample_job",
    "sample_values",
]
