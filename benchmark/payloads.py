"""Request bodies the load generator sends: the README's sample, one object, N objects."""

import json

SAMPLE_PATH = "/data?key={key}&value={value}&foo={bar}"
SAMPLE_DATA = [{"key": "Azureus", "value": "Dendrobates"}, {"key": "Phyllobates", "value": "Terribilis"}]


def body(endpoint_url: str, data: list[dict[str, str]], method: str = "GET") -> bytes:
    return json.dumps({"endpoint": {"method": method, "url": endpoint_url}, "data": data}).encode()


def sample(receiver_base: str) -> bytes:
    """The README's request: GET with two data objects, `{bar}` left to the default."""
    return body(receiver_base + SAMPLE_PATH, SAMPLE_DATA)


def objects(count: int) -> list[dict[str, str]]:
    """`count` data objects shaped like the sample's."""
    return [{"key": f"key{index}", "value": f"value{index}"} for index in range(count)]


def with_objects(receiver_base: str, count: int) -> bytes:
    """One request carrying `count` data objects (1: a flood request; 100: fanout)."""
    return sample(receiver_base) if count == 2 else body(receiver_base + SAMPLE_PATH, objects(count))


def mean_object_json_bytes(count: int) -> float:
    """Mean size of one data object as compact JSON, as the service stores it."""
    texts = [json.dumps(data, separators=(",", ":")) for data in objects(count)]
    return sum(len(text.encode()) for text in texts) / len(texts)
