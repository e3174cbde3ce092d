from services.common.server import run
from services.retrieval.service import build

if __name__ == "__main__":
    run("retrieval", build)
