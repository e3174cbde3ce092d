"""What `loupe search` prints: JSON lines for programs, a short table for people."""

from __future__ import annotations

from typing import Any

from loupe.v1 import common_pb2, gateway_pb2


def box_list(box: common_pb2.Box) -> list[float]:
    return [round(box.x0, 1), round(box.y0, 1), round(box.x1, 1), round(box.y1, 1)]


def hit_json(hit: common_pb2.Hit) -> dict[str, Any]:
    entry: dict[str, Any] = {"item_id": hit.item_id, "score": round(hit.score, 6)}
    if hit.object_index > 0:
        entry["box"] = box_list(hit.box)
    return entry


def search_json(query: str, response: gateway_pb2.SearchResponse, objects: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"query": query, "results": [hit_json(h) for h in response.results]}
    if response.degraded:
        entry["degraded"] = list(response.degraded_reasons) or True
    if objects:
        entry["objects"] = [
            {
                "box": box_list(o.detection.box),
                "label": o.detection.label,
                "score": round(o.detection.score, 4),
                "results": [hit_json(h) for h in o.results],
            }
            for o in response.objects
        ]
    return entry


def hit_lines(hits: list[common_pb2.Hit], indent: str = "  ") -> list[str]:
    lines = []
    for rank, hit in enumerate(hits, start=1):
        where = (
            f"  object {hit.label or hit.object_index} {box_list(hit.box)}"
            if (hit.object_index > 0)
            else ""
        )
        lines.append(f"{indent}{rank:>3}. {hit.score:.4f}  {hit.item_id}{where}")
    return lines or [f"{indent}(no results)"]


# What a degraded answer left out, as `loupe search` says it.
DEGRADED_NOTES = {
    "detection": "detection unavailable: no objects searched",
    "ranking": "ranking unavailable: retrieval's order",
}


def degraded_note(response: gateway_pb2.SearchResponse) -> str:
    reasons = [DEGRADED_NOTES.get(r, f"{r} unavailable") for r in response.degraded_reasons]
    return f"  (degraded: {'; '.join(reasons) or 'a backend failed'})"


def search_text(query: str, response: gateway_pb2.SearchResponse, objects: bool) -> str:
    cached = "  (cached)" if response.cached else ""
    degraded = degraded_note(response) if response.degraded else ""
    lines = [f"{query}{cached}{degraded}", *hit_lines(list(response.results))]
    if objects:
        # With detection down, the first line says why there are none.
        if not response.objects and "detection" not in response.degraded_reasons:
            lines.append("  no objects detected")
        for o in response.objects:
            d = o.detection
            lines.append(f"  {d.label} {d.score:.2f} at {box_list(d.box)}:")
            lines += hit_lines(list(o.results), indent="    ")
    return "\n".join(lines)
