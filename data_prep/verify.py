"""Check a prepared feature directory against its index: ``python -m hpc_asr prep verify DIR``.

Every shard listed in ``index.json`` is opened and compared with its row: size in bytes, format
and version, feature settings, utterance and frame counts, offsets, the checksum of its frames,
and NaN/Inf. Totals and the CMVN frame count must add up. Exit 0 when all agree; otherwise 1 with
one line naming the first problem (e.g. a truncated shard), which is what to re-prep.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hpc_asr.data.shards import check_shard, read_index


def verify(directory: str | Path) -> str | None:
    """The first problem found, or None when every shard matches the index."""
    directory = Path(directory)
    try:
        index = read_index(directory)
    except (ValueError, FileNotFoundError) as e:
        return str(e)
    for row in index["shards"]:
        problem = check_shard(directory, row, index["features"])
        if problem:
            return problem
    utts = sum(r["utterances"] for r in index["shards"])
    frames = sum(r["frames"] for r in index["shards"])
    if utts != index["utterances"] or frames != index["frames"] or frames != index["cmvn"]["frames"]:
        return (f"{directory / 'index.json'}: totals {index['utterances']} utterances / {index['frames']} frames "
                f"(CMVN {index['cmvn']['frames']}) differ from the shards' {utts} / {frames}")
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("directory", type=Path, help="a directory written by data_prep.fbank")
    args = p.parse_args(argv)
    problem = verify(args.directory)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    index = read_index(args.directory)
    print(f"[verify] {args.directory}: {len(index['shards'])} shards, {index['utterances']} utterances, "
          f"{index['frames']} frames: OK", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
