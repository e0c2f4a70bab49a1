"""``python -m trainer.autoencoder_overrides <run dir | checkpoint root | root/tag | autoencoder.safetensors>``

Prints the ``model.autoencoder`` overrides with which a diffusion job (or a latent-cache precompute)
uses the autoencoder a ``task=autoencoder`` run trained, e.g.
``python -m trainer.train experiment=... $(python -m trainer.autoencoder_overrides runs/ae)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from trainer.runtime.checkpoint import read_autoencoder_metadata, resolve_autoencoder_file


def autoencoder_overrides(checkpoint: str) -> list[str]:
    """``model.autoencoder.checkpoint_path=...`` (local: resolved from disk) and the latent scale the
    run measured, ``model.autoencoder.scale_factor=...``."""
    url = resolve_autoencoder_file(checkpoint)
    meta = read_autoencoder_metadata(url)
    return [f"model.autoencoder.checkpoint_path={Path(url).resolve()}",
            f"model.autoencoder.scale_factor={float(meta['scale_factor'])!r}"]


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    try:
        print(" ".join(autoencoder_overrides(argv[0])))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
