"""Put real photos for the demo in a folder: the sample photos inside scikit-image's wheel.

    python tools/demo_photos.py DEST

Only the wheel is downloaded (pip download --no-deps); nothing is installed.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".cache" / "wheels"
PHOTOS = [
    "astronaut.png", "camera.png", "chelsea.png", "coffee.png", "rocket.jpg",
    "motorcycle_left.png", "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg",
    "brick.png", "grass.png", "gravel.png", "coins.png", "moon.png", "ihc.png", "cell.png",
    "page.png", "text.png",
]  # fmt: skip


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    dest = Path(sys.argv[1])
    if dest.is_dir() and all((dest / name).is_file() for name in PHOTOS):
        print(f"{len(PHOTOS)} demo photos already in {dest}")
        return 0
    wheels = sorted(WHEELS.glob("scikit_image-*.whl"))
    if not wheels:
        print("==> downloading the scikit-image wheel for its sample photos")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", "--dest", str(WHEELS), "scikit-image>=0.22"],
            check=True,
        )  # fmt: skip
        wheels = sorted(WHEELS.glob("scikit_image-*.whl"))
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[-1]) as wheel:
        for name in PHOTOS:
            (dest / name).write_bytes(wheel.read(f"skimage/data/{name}"))
    print(f"{len(PHOTOS)} demo photos in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
