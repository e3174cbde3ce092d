"""`python -m services.embedding`: the embedding service process."""

from services.common.server import run
from services.embedding.service import build

if __name__ == "__main__":
    run("embedding", build)
