"""Write WebDataset shards: one tar member per part of a sample, `KEY.EXT`."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable
from pathlib import Path


def write_shard(path: str | Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write samples `(key, {extension: bytes})` to a tar shard, members in the given order.

    Member times are fixed at zero so that the same samples give the same bytes. Returns the
    number of samples written.
    """
    count = 0
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, parts in samples:
            for extension, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
            count += 1
    return count
