"""The function registry: deployed functions, kept in etcd, with an in-memory cache for the hot
path (the cache is refreshed on every write through this controller and on each reconcile pass).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sllm import keys
from sllm.errors import Conflict, FunctionNotFound, ManifestError, ModelNotFound
from sllm.etcd import Etcd
from sllm.manifest import FunctionManifest
from sllm.messages import FunctionRecord
from store.checkpoint.format import INDEX_NAME
from store.model_store import ModelStore


class FunctionRegistry:
    """CRUD over functions.

    Args:
        etcd: the durable store.
        model_exists: tells whether a model name is in the model store.
    """

    def __init__(self, etcd: Etcd, model_exists: Callable[[str], bool]) -> None:
        self._etcd = etcd
        self._model_exists = model_exists
        self.cache: dict[str, FunctionRecord] = {}

    def _check_model(self, manifest: FunctionManifest) -> None:
        if not self._model_exists(manifest.spec.model):
            raise ManifestError(
                f"spec.model: no model named {manifest.spec.model!r} in the model store "
                f"(import it with: sllm model import SOURCE --name {manifest.spec.model})",
                param="spec.model",
            )

    async def create(self, manifest: FunctionManifest) -> FunctionRecord:
        """Deploy a new function. Raises Conflict if the name is taken, ManifestError if its
        model is not in the store."""
        self._check_model(manifest)
        now = time.time()
        record = FunctionRecord(manifest=manifest, created=now, updated=now)
        if not await self._etcd.create(keys.Kind.FUNCTION, manifest.name, record):
            raise Conflict(f"function {manifest.name!r} already exists (use sllm fn update)")
        self.cache[manifest.name] = record
        return record

    async def apply(self, manifest: FunctionManifest) -> tuple[FunctionRecord, bool]:
        """Create or replace a function. Returns the record and whether it was created."""
        self._check_model(manifest)
        old = await self._etcd.get(keys.Kind.FUNCTION, manifest.name, FunctionRecord)
        now = time.time()
        if old is None:
            record = FunctionRecord(manifest=manifest, created=now, updated=now)
        else:
            record = FunctionRecord(manifest=manifest, created=old.created, updated=now,
                                    generation=old.generation + 1)
        await self._etcd.put(keys.Kind.FUNCTION, manifest.name, record)
        self.cache[manifest.name] = record
        return record, old is None

    async def get(self, name: str, *, cached: bool = False) -> FunctionRecord:
        """One function; ``cached`` answers from memory when it can (the invocation hot path).
        Raises FunctionNotFound."""
        if cached and name in self.cache:
            return self.cache[name]
        record = await self._etcd.get(keys.Kind.FUNCTION, name, FunctionRecord)
        if record is None:
            self.cache.pop(name, None)
            raise FunctionNotFound(f"no function named {name!r}")
        self.cache[name] = record
        return record

    async def list(self) -> list[FunctionRecord]:
        """Every function, by name; refreshes the cache."""
        records = await self._etcd.list(keys.Kind.FUNCTION, FunctionRecord)
        self.cache = {r.manifest.name: r for r in records}
        return records

    async def delete(self, name: str) -> FunctionRecord:
        """Remove a function. Raises FunctionNotFound."""
        record = await self.get(name)
        await self._etcd.delete(keys.Kind.FUNCTION, name)
        self.cache.pop(name, None)
        return record


class CheckpointSizes:
    """Checkpoint sizes of the models in the store root, cached per version of their index (a
    placement decision needs the size; reading an index takes milliseconds).

    Args:
        store: the store root.
    """

    def __init__(self, store: ModelStore) -> None:
        self._store = store
        self._cache: dict[str, tuple[int, int]] = {}  # name -> (index mtime ns, bytes)

    def __call__(self, model: str) -> int:
        """Bytes of ``model``'s checkpoint. Raises ModelNotFound, InvalidRequest, CheckpointError."""
        path = self._store.path(model)
        try:
            mtime = (path / INDEX_NAME).stat().st_mtime_ns
        except FileNotFoundError:
            raise ModelNotFound(f"model {model!r} is not in the store", param="model") from None
        hit = self._cache.get(model)
        if hit is not None and hit[0] == mtime:
            return hit[1]
        nbytes = self._store.get(model).nbytes
        self._cache[model] = (mtime, nbytes)
        return nbytes
