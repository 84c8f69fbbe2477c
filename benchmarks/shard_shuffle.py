"""One shard's assembly: peak memory and time of the in-memory shuffle against the shuffle
through local disk (``preprocessing/parts.py``'s ``write_shard``), for a shard of ``--rows``.

A fixed ``--num-shards`` over a big corpus makes big shards (English Wikipedia at 256 shards:
~800k rows each). The part files here are real examples: the rows of a data dir's shards
(``--data``, by default the one run_beam.py writes from the bundled dump sample, built once
into a temporary dir), repeated into parts of 8 row groups as a read task writes them. Each
method runs in a process of its own; its peak RSS is ``ru_maxrss``.

    python benchmarks/shard_shuffle.py [--rows 400000] [--data DATA_DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from preprocessing import parts  # noqa: E402

WRITE = """
import resource, sys, time
sys.path.insert(0, {repo!r})
import pyarrow.parquet as pq
from preprocessing import parts
infos = [parts.PartInfo(i, p, pq.ParquetFile(p).metadata.num_rows) for i, p in enumerate({paths!r})]
layout = parts.ShardLayout.plan(infos, 1, 0)
started = time.monotonic()
rows = parts.write_shard(layout, 0, 12345, {out!r}, {in_memory_rows})
print(rows, time.monotonic() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_parts(data: str, rows: int, folder: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data_dir import read_manifest

    manifest = read_manifest(data)
    table = pa.concat_tables(pq.read_table(os.path.join(data, s["path"])) for s in manifest["shards"])
    paths, made, per_part = [], 0, 8 * 8192
    while made < rows:
        take = min(per_part, rows - made)
        repeats = -(-take // table.num_rows)
        part = pa.concat_tables([table] * repeats).slice(0, take)
        paths.append(os.path.join(folder, f"task-{len(paths):06d}.parquet"))
        pq.write_table(part, paths[-1], compression="zstd", row_group_size=8192)
        made += take
    return paths


def sample_data_dir(folder: str) -> str:
    out = os.path.join(folder, "data")
    subprocess.run([sys.executable, os.path.join(REPO, "preprocessing", "run_beam.py"), "--output", out,
                    "--vocab-size", "8000", "--dupe-factor", "2", "--no-mlflow"], check=True, capture_output=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python benchmarks/shard_shuffle.py")
    p.add_argument("--rows", type=int, default=400_000, help="rows in the shard")
    p.add_argument("--data", help="a data dir whose rows fill the parts (default: the bundled sample's)")
    args = p.parse_args()
    if args.rows <= parts.SHUFFLE_IN_MEMORY_ROWS:  # below it, both rows would be the in-memory path
        p.error(f"--rows must be above {parts.SHUFFLE_IN_MEMORY_ROWS:,}, the most a shard is shuffled in memory")
    if args.data and not os.path.isfile(os.path.join(args.data, "manifest.json")):
        p.error(f"--data {args.data}: no manifest.json there (a data dir of preprocessing/run_beam.py)")
    with tempfile.TemporaryDirectory(prefix="shard_shuffle_") as tmp:
        paths = write_parts(args.data or sample_data_dir(tmp), args.rows, tmp)
        print(f"one shard of {args.rows:,} rows from {len(paths)} parts")
        print(f"{'method':<24} {'seconds':>8} {'peak RSS MB':>12}")
        for name, limit in (("in memory", args.rows), ("through local disk", parts.SHUFFLE_IN_MEMORY_ROWS)):
            code = WRITE.format(repo=REPO, paths=paths, out=os.path.join(tmp, "shard.parquet"), in_memory_rows=limit)
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            rows, seconds, peak_kb = proc.stdout.split()
            assert int(rows) == args.rows
            print(f"{name:<24} {float(seconds):>8.1f} {int(peak_kb) / 1024:>12,.0f}", flush=True)


if __name__ == "__main__":
    main()
