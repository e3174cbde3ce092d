#!/usr/bin/env bash
# The whole job on a fresh machine: set up, start the stack, index real photos, search them.
# The photos are the sample photos that ship inside the scikit-image wheel from PyPI
# (downloaded, not installed). DEMO_IMAGES=/some/folder indexes your own photos as well.
set -euo pipefail
cd "$(dirname "$0")/.."

tools/setup.sh
PHOTOS=.cache/demo-photos
.venv/bin/python tools/demo_photos.py "$PHOTOS"
loupe=.venv/bin/loupe

echo "==> starting the stack (five services, milvus-lite, redis-server)"
$loupe up
echo "==> indexing $PHOTOS with object detection"
$loupe index "$PHOTOS" --detect
if [ -n "${DEMO_IMAGES:-}" ]; then
  $loupe index "$DEMO_IMAGES" --detect
fi

show() { echo; echo "\$ loupe $*"; $loupe "$@"; }
echo; echo "==> searches"
# The stereo pair: the right-eye view should come first.
show search "$PHOTOS/motorcycle_left.png" --top-k 3
# Similar Looks: the astronaut, and each object detected in the photo.
show search "$PHOTOS/astronaut.png" --objects --top-k 3
# Flashlight: only the region of the cup in the coffee photo.
show search "$PHOTOS/coffee.png" --box 170,15,410,300 --top-k 3
# Related Pins: more like an indexed item, never the item itself.
show search --item chelsea.png --top-k 3
show search "$PHOTOS/rocket.jpg" --top-k 3 --json
echo
echo "The stack is still running (gateway 127.0.0.1:50051): search more with $loupe search,"
echo "then stop it with: $loupe down"
