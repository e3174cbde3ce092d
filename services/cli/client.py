"""Reaching the gateway from the command line."""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from services.cli.stack import StackState

DEFAULT_DATA_DIR = Path(".loupe")
MAX_MESSAGE_BYTES = 64 << 20


def gateway_address(flag: str | None, data_dir: Path = DEFAULT_DATA_DIR) -> str:
    """--gateway, else LOUPE_GATEWAY, else the stack `loupe up` started here, else the default."""
    if flag:
        return flag
    if os.environ.get("LOUPE_GATEWAY"):
        return os.environ["LOUPE_GATEWAY"]
    state = StackState.load(data_dir.resolve())
    if state is not None:
        return state.gateway
    return "127.0.0.1:50051"


def channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        address,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ],
    )
