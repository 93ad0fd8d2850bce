"""Files written whole or not at all."""

from __future__ import annotations

import os
import pathlib


def write_whole(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes `data` to `path` through a temporary file beside it and a rename, so that a
    crash leaves the previous file or the new one, never a torn one. The temporary's name
    carries the process id, so concurrent writers do not share it."""
    path = pathlib.Path(path)
    temporary = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    with open(temporary, 'wb') as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    temporary.replace(path)
