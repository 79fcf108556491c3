"""A tiny library: prices in cents, formatted."""

__version__ = "0.1.0"


def format_cents(cents: int) -> str:
    """1234 -> '12.34'."""
    sign = "-" if cents < 0 else ""
    return f"{sign}{abs(cents) // 100}.{abs(cents) % 100:02d}"
