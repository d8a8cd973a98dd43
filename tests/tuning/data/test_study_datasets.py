"""The study's datasets: read once into the object store and shared by its trials, whose one
Train worker iterates them itself (no streaming split). Real Ray, real Ray Train, a tiny cache."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import ray.train
from ray.data.dataset import MaterializedDataset
from ray.train.torch import TorchTrainer
from ray.util.state import list_actors, list_tasks

from heimdall.catalog import open_catalog
from heimdall.datasets import generate_dataset
from heimdall.errors import ConfigError
from heimdall.features import FeatureConfig
from heimdall.store import LocalStore
from tuning.data.pipeline import FeatureCache, ensure_feature_cache, study_datasets
from tuning.study.spaces import validate_space
from tuning.study.trial import TrialSpec, _dataset_config
from tuning.study.tune import StudyConfig

pytestmark = pytest.mark.ray

EPOCHS = 3


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, ray_session: object) -> tuple[LocalStore, FeatureCache]:
    root = tmp_path_factory.mktemp("study-datasets")
    catalog = open_catalog(f"sqlite:///{root / 'catalog.db'}")
    store = LocalStore(root / "store")
    generate_dataset(catalog, store, "tiny", n_recordings=96, seed=5, shard_size=12)
    return store, ensure_feature_cache(catalog, store, "tiny", FeatureConfig(), workers=1)


def _spec(workers: int) -> TrialSpec:
    return TrialSpec(study=StudyConfig("data", workers_per_trial=workers), space=validate_space({
        "arch": "resnet", "parameters": {"optimizer.lr": {"loguniform": [1e-4, 1e-3]}}}), train_storage="/tmp")


def _loop() -> Any:
    # Made here, so that cloudpickle sends it by value (the workers cannot import a test module).
    def loop(config: dict[str, Any]) -> None:
        train, val = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
        orders = []
        for _ in range(EPOCHS):
            orders.append([float(t[0]) for b in train.iter_batches(batch_format="numpy", batch_size=None)
                           for t in b["target"]])
        val_rows = sum(len(b["target"]) for b in val.iter_batches(batch_format="numpy", batch_size=None))
        Path(config["out"]).write_text(json.dumps({"orders": orders, "val_rows": val_rows,
                                                   "iterator": type(train).__name__}))

    return loop


def _trial(datasets: dict[str, Any], spec: TrialSpec, storage: Path, name: str) -> dict[str, Any]:
    out = storage / f"{name}.json"  # the worker runs on this machine
    trainer = TorchTrainer(_loop(), train_loop_config={"out": str(out)}, datasets=datasets,
                           dataset_config=_dataset_config(spec),
                           scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                           run_config=ray.train.RunConfig(name=name, storage_path=str(storage)))
    trainer.fit()
    return json.loads(out.read_text())


def _reads_since(address: str, since: float) -> int:
    """Ray Data read tasks submitted after ``since`` (their events reach the GCS about once a second)."""
    time.sleep(2.0)
    tasks = list_tasks(address=address, filters=[("type", "=", "NORMAL_TASK")], limit=10_000, detail=True,
                       raise_on_missing_output=False)
    return sum("ReadParquet" in (t.name or "") and (t.creation_time_ms or 0) / 1000 > since for t in tasks)


def _coordinators(address: str) -> int:
    return len(list_actors(address=address, filters=[("class_name", "=", "SplitCoordinator")], limit=10_000,
                           raise_on_missing_output=False))


def test_trials_read_the_study_datasets_from_the_object_store_without_a_split(
        built: tuple[LocalStore, FeatureCache], ray_session: Any, tmp_path: Path) -> None:
    store, cache = built
    address, start = ray_session.address, time.time()
    datasets = study_datasets(cache, store, seed=11)
    assert isinstance(datasets["val"], MaterializedDataset)
    assert _reads_since(address, start) >= 1, "the cache files are read by tasks named ReadParquet: revisit _reads_since"
    coordinators, start = _coordinators(address), time.time()

    trials = [_trial(datasets, _spec(1), tmp_path, f"trial-{i}") for i in range(2)]

    assert _reads_since(address, start) == 0, "a trial read cache files again instead of the study's blocks"
    assert _coordinators(address) == coordinators, "a one-worker trial started a SplitCoordinator"
    for metrics in trials:
        assert metrics["iterator"] != "StreamSplitDataIterator"
        assert metrics["val_rows"] == cache.counts["val"]
        orders = metrics["orders"]
        assert all(sorted(o) == sorted(orders[0]) and len(o) == cache.counts["train"] for o in orders)
        assert len({tuple(o) for o in orders}) > 1, "the train rows came in the same order every epoch"


def test_a_cache_too_large_for_the_object_store_is_streamed_by_each_trial(built: tuple[LocalStore, FeatureCache]) -> None:
    store, cache = built
    datasets = study_datasets(cache, store, seed=11, object_store_bytes=1)
    assert not any(isinstance(d, MaterializedDataset) for d in datasets.values())
    assert datasets["val"].count() == cache.counts["val"]



def test_an_unknown_split_is_named_in_the_error(built: tuple[LocalStore, FeatureCache]) -> None:
    store, cache = built
    with pytest.raises(ConfigError, match="'tests'"):
        study_datasets(cache, store, ("val", "tests"))
