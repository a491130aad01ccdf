"""Integer arithmetic the engine's sizes share."""


def cdiv(a: int, b: int) -> int:
    """a / b rounded up, for a >= 0 and b > 0: the pages `a` tokens fill, a shard of `a` rows over `b` ranks."""
    return -(-a // b)
