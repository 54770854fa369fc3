"""Model-folder download: kubetune's ObjectStore.download_folder vs. boto3's default loop.

A folder shaped like a saved model (a few large safetensors shards, config and tokenizer files)
is uploaded to the local S3 server (versitygw on 127.0.0.1); then it is downloaded, alternately,
by the baseline (one ``client.download_file`` per object, one after another, boto3's default
TransferConfig: what a hand-written loop does) and by kubetune's path (one s3transfer
TransferManager for the whole folder: storage.maxConcurrency requests across files and parts,
parts of storage.partSizeMi). Each file's bytes are checked against the uploaded ones. Printed:
MB/s of each and the ratio, per round and the median, and the command.

    .venv/bin/python bench/bench_transfers.py --size-mb 1024 --rounds 3
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune_api.spec import StorageSpec
from kubetune_localenv import stack
from kubetune_localenv.cluster import LocalEnv
from kubetune_trainer.storage import ObjectStore

COMMAND = "python bench/bench_transfers.py"
SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def make_folder(folder: Path, size_mb: int, shards: int) -> dict[str, str]:
    """Random shards adding up to ``size_mb`` plus small files; returns each file's sha256."""
    folder.mkdir(parents=True)
    digests: dict[str, str] = {}
    shard_bytes = size_mb * 1024 * 1024 // shards
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        (folder / name).write_bytes(os.urandom(shard_bytes))
    for name in SMALL_FILES:
        (folder / name).write_bytes(os.urandom(64 * 1024))
    for path in folder.iterdir():
        digests[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def check(dest: Path, digests: dict[str, str]) -> None:
    found = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in dest.iterdir()}
    if found != digests:
        raise SystemExit(f"downloaded files differ from the uploaded ones in {dest}")


def baseline(client: Any, bucket: str, prefix: str, dest: Path) -> None:
    """boto3's default single-object loop."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        for obj in page.get("Contents", []):
            target = dest / obj["Key"][len(prefix) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(target))


def timed(what: str, run: Callable[[], object], dest: Path, digests: dict[str, str], size_mb: int) -> float:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    check(dest, digests)
    rate = size_mb / seconds
    print(f"  {what}: {seconds:.2f} s, {rate:.0f} MB/s", flush=True)
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="total size of the shards (MB)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=StorageSpec().max_concurrency)
    parser.add_argument("--part-size-mi", type=int, default=StorageSpec().part_size_mi)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-transfers-"))
    env = LocalEnv(work / "env", with_controller_manager=False)
    env.start()
    try:
        assert env.s3 is not None
        for key, value in env.s3.env().items():
            os.environ[key] = value
        client = stack.s3_client(env)
        client.create_bucket(Bucket="bench")
        digests = make_folder(work / "model", args.size_mb, args.shards)
        spec = StorageSpec(
            endpoint=env.s3.endpoint,
            addressing_style="path",
            max_concurrency=args.concurrency,
            part_size_mi=args.part_size_mi,
        )
        store = ObjectStore.from_spec(spec)
        store.upload_folder(work / "model", "s3://bench/models/m")
        ratios: list[float] = []
        for round_ in range(1, args.rounds + 1):
            print(f"round {round_}/{args.rounds}", flush=True)
            base = timed(
                "boto3 loop",
                lambda: baseline(client, "bench", "models/m/", work / "a"),
                work / "a",
                digests,
                args.size_mb,
            )
            fast = timed(
                "kubetune download_folder",
                lambda: store.download_folder("s3://bench/models/m", work / "b"),
                work / "b",
                digests,
                args.size_mb,
            )
            ratios.append(fast / base)
            print(f"  ratio: {fast / base:.2f}x", flush=True)
        print(
            f"\nmodel folder download, {args.size_mb} MB in {args.shards} shards"
            f" + {len(SMALL_FILES)} small files,"
            f" maxConcurrency {args.concurrency}, partSizeMi {args.part_size_mi}, {os.cpu_count()} CPUs:"
            f" median ratio {statistics.median(ratios):.2f}x (goal >= 2x)"
        )
        print(
            f"reproduce: {COMMAND} --size-mb {args.size_mb} --shards {args.shards} --rounds {args.rounds}"
            f" --concurrency {args.concurrency} --part-size-mi {args.part_size_mi}"
        )
        return 0
    finally:
        env.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
