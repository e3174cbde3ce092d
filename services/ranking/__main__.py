from services.common.server import run
from services.ranking.service import build

if __name__ == "__main__":
    run("ranking", build)
