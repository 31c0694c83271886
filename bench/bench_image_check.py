"""Time the build-time image check (`trl_rejection.io.check_image`) per image, against a full decode.

    python bench/bench_image_check.py        # prints one JSON line per case (median ms of 200 calls)

COCO-sized (640x480) images of smooth gradients plus noise, as JPEG (quality 90) and PNG, written to a temp folder.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from trl_rejection.io import check_image


def _image(path: Path, fmt: str) -> None:
    gradient = Image.linear_gradient("L").resize((640, 480)).convert("RGB")
    Image.blend(gradient, Image.effect_noise((640, 480), 40).convert("RGB"), 0.3).save(path, format=fmt, quality=90)


def _median_ms(fn, n: int = 200) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, suffix in (("JPEG", ".jpg"), ("PNG", ".png")):
            path = Path(tmp) / f"img{suffix}"
            _image(path, fmt)

            def full() -> None:
                with Image.open(path) as im:
                    im.load()

            print(json.dumps({"format": fmt, "bytes": path.stat().st_size, "machine": platform.machine(),
                              "cores": os.cpu_count(),
                              "check_decode_ms": round(_median_ms(lambda: check_image(str(path))), 3),
                              "check_open_ms": round(_median_ms(lambda: check_image(str(path), level="open")), 3),
                              "full_decode_ms": round(_median_ms(full), 3)}))


if __name__ == "__main__":
    main()
