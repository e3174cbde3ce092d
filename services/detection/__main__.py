"""`python -m services.detection`: the detection service process."""

from services.common.server import run
from services.detection.service import build

if __name__ == "__main__":
    run("detection", build)
