"""spec.model.cache: a base model downloaded once into the cache volume and reused, checked
before use, replaced when the model changes, evicted least recently used; against the real S3
server, and through the real entrypoint for a retried pod."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.spec import StorageSpec
from kubetune_trainer import modelcache
from kubetune_trainer.storage import ObjectStore

from .conftest import TrainerRun, alpaca_records, to_jsonl, upload_folder

pytestmark = pytest.mark.s3


@dataclass
class CountingStore(ObjectStore):
    """The real store, counting the objects it downloads."""

    downloads: list[str] = field(default_factory=list)

    def download_many(self, items: list[tuple[str, Path]]) -> list[Path]:
        self.downloads.extend(uri for uri, _ in items)
        return super().download_many(items)


@pytest.fixture
def store(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> CountingStore:
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    plain = ObjectStore.from_spec(StorageSpec(endpoint=s3_env["AWS_ENDPOINT_URL"], addressing_style="path"))
    return CountingStore(plain.client, plain.transfer)


def _model(store: ObjectStore, bucket: str, tmp_path: Path, name: str, files: dict[str, bytes]) -> str:
    folder = tmp_path / "upload" / name
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    upload_folder(store.client, folder, bucket, f"models/{name}")
    return f"s3://{bucket}/models/{name}"


def test_second_fetch_reads_the_cache_and_a_changed_or_damaged_model_downloads_again(
    store: CountingStore, bucket: str, tmp_path: Path
) -> None:
    files = {"config.json": b'{"a": 1}', "shards/model-00001.safetensors": b"x" * 5000}
    source = _model(store, bucket, tmp_path, "m", files)
    cache = tmp_path / "cache"

    first = modelcache.fetch(store, source, cache, None)
    assert sorted(store.downloads) == [f"{source}/config.json", f"{source}/shards/model-00001.safetensors"]
    assert (first / "shards/model-00001.safetensors").read_bytes() == files["shards/model-00001.safetensors"]
    store.downloads.clear()
    assert modelcache.fetch(store, source, cache, None) == first
    assert store.downloads == []  # a retried pod: no download

    # A file truncated on the volume is not used: downloaded again, same key.
    (first / "shards/model-00001.safetensors").write_bytes(b"x" * 10)
    assert modelcache.problem(first, source, modelcache.listing(store, source)) == (
        "shards/model-00001.safetensors has 10 bytes, the object 5000"
    )
    assert modelcache.fetch(store, source, cache, None) == first
    assert len(store.downloads) == 2
    assert (first / "shards/model-00001.safetensors").stat().st_size == 5000

    # The model rewritten in object storage: a new key, never the stale copy.
    store.client.put_object(Bucket=bucket, Key="models/m/config.json", Body=b'{"a": 2}')
    again = modelcache.fetch(store, source, cache, None)
    assert again != first
    assert (again / "config.json").read_bytes() == b'{"a": 2}'


def test_a_killed_download_leaves_no_entry_and_the_next_one_cleans_it_up(
    store: CountingStore, bucket: str, tmp_path: Path
) -> None:
    source = _model(store, bucket, tmp_path, "m", {"config.json": b"{}", "w.bin": b"w" * 100})
    cache = tmp_path / "cache"
    key = modelcache.entry_key(source, modelcache.listing(store, source))
    partial = cache / f"{modelcache.PARTIAL_PREFIX}{key}-deadbeef"
    partial.mkdir(parents=True)
    (partial / "config.json").write_bytes(b"{}")  # a pod killed after one file
    assert modelcache.problem(cache / key, source, modelcache.listing(store, source)) == "not cached"
    entry = modelcache.fetch(store, source, cache, None)
    assert entry == cache / key
    assert not partial.exists()
    assert json.loads((entry / modelcache.MARKER).read_text())["source"] == source


def test_eviction_removes_the_least_recently_used_other_models_to_fit_max_size(
    store: CountingStore, bucket: str, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    sources = [_model(store, bucket, tmp_path, f"m{i}", {"w.bin": bytes([i]) * 1000}) for i in range(3)]
    entries = [modelcache.fetch(store, s, cache, None) for s in sources]
    modelcache.fetch(store, sources[0], cache, None)  # m0 used again: m1 is now the least recent
    fourth = _model(store, bucket, tmp_path, "m3", {"w.bin": b"z" * 1000})
    # Room for three models of about 1 kB (markers included): one of the others must go.
    newest = modelcache.fetch(store, fourth, cache, 3 * 1000 + 3 * 400)
    left = {e.name for e in cache.iterdir() if e.is_dir() and (e / modelcache.MARKER).exists()}
    assert left == {entries[0].name, entries[2].name, newest.name}


def test_pods_fetching_the_same_model_at_once_download_it_once(
    store: CountingStore, bucket: str, tmp_path: Path
) -> None:
    source = _model(store, bucket, tmp_path, "m", {"config.json": b"{}", "w.bin": b"w" * 200_000})
    cache = tmp_path / "cache"
    found: list[Path] = []
    threads = [
        threading.Thread(target=lambda: found.append(modelcache.fetch(store, source, cache, None)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(found) == 3
    assert len(set(found)) == 1
    assert sorted(store.downloads) == [f"{source}/config.json", f"{source}/w.bin"]


@pytest.mark.slow
def test_a_retried_pod_trains_from_the_cached_model_without_downloading_it(
    trainer_run: TrainerRun, s3_client: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = trainer_run
    upload_folder(s3_client, tiny_model_dir, run.bucket, "models/tiny")
    s3_client.put_object(Bucket=run.bucket, Key="data/train.jsonl", Body=to_jsonl(alpaca_records(16)))
    run.config["training"].update({"maxSteps": 2, "saveSteps": 2})
    run.config["method"] = "lora"
    run.config["modelCacheDir"] = str(tmp_path / "model-cache")
    run.config["model"]["cache"] = {"claimName": "models"}
    code, log = run.run()
    assert code == 0, log
    assert f"model cache: downloading s3://{run.bucket}/models/tiny" in log
    assert not (tmp_path / "scratch" / "base-model").exists()  # the model is on the cache volume only

    # A new pod (fresh scratch) of another run on the same model: no download.
    run.config["workDir"] = str(tmp_path / "scratch-2")
    run.config["output"]["uri"] = f"s3://{run.bucket}/out/job-2"
    code, log = run.run(log_name="second.log")
    assert code == 0, log
    assert f"model cache: s3://{run.bucket}/models/tiny from" in log
    assert "(no download)" in log
